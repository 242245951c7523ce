"""Causal attention over a varying set of keys, computed only where it is needed.

Three paths, one meaning (``visible(q_pos, k_pos)`` says which keys each query sees):
- every row computes and sees its whole past: one SDPA call with ``is_causal``;
- arbitrary subsets without a window: one SDPA call with a boolean mask;
- a recent window (plus sinks): queries in blocks, each block gathering only the keys
  it can see (sinks + a contiguous recent range), so skipped keys cost no time.
Excluded keys never enter the softmax: masks are boolean, keys are never zeroed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

QUERY_BLOCK = 128


def _sdpa(q, k, v, scale, mask=None, is_causal=False):
    # q (Tq, H, hd), k/v (Tk, Hkv, hd) -> (Tq, H*hd); SDPA wants (1, heads, T, hd).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=None if mask is None else mask[None, None], is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def _additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean visibility -> additive mask (0 or -inf) in the query dtype; faster than boolean masks in CPU SDPA."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    visible: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    window: int | None,
    sinks: int,
    full_causal: bool,
    plan: list | None = None,
    bias: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Attention output (Tq, H*hd) and the number of (query, key) pairs actually seen.

    ``q_pos`` and ``k_pos`` are sorted true positions. ``full_causal`` says that queries
    and keys are the same complete sequence with no window (the fast path). ``plan`` is a
    precomputed ``block_plan`` for these positions and window. ``bias(q_pos, k_pos)`` adds
    to the scores of visible keys (fusion's log group size).
    """
    tq = q.shape[0]
    if full_causal:
        return _sdpa(q, k, v, scale, is_causal=tq > 1), tq * (tq + 1) // 2
    if window is None:
        seen = visible(q_pos, k_pos)
        if bias is None and bool(seen.all()):  # e.g. one decode query that sees its whole cache
            return _sdpa(q, k, v, scale), seen.numel()
        mask = _additive(seen, q.dtype)
        if bias is not None:
            mask = mask + bias(q_pos, k_pos).to(q.dtype)
        return _sdpa(q, k, v, scale, mask=mask), int(seen.sum())
    plan = plan if plan is not None else block_plan(q_pos, k_pos, visible, window, sinks, q.dtype, bias)
    outs = [_sdpa(q[qs], k[ks], v[ks], scale, mask=mask) for qs, ks, mask, _ in plan]
    return torch.cat(outs), sum(p[3] for p in plan)


def block_plan(q_pos, k_pos, visible, window: int, sinks: int, dtype: torch.dtype = torch.float32, bias=None) -> list:
    """Per query block: (query slice, key index, additive float mask, pairs seen).

    Each block gathers the sinks and the contiguous range of recent keys it can see.
    Additive float masks (0 / -inf) run about 1.7x faster than boolean ones in CPU SDPA
    with grouped-query attention; the engine reuses one plan for every layer that shares it.
    """
    plan = []
    n_sink = int(torch.searchsorted(k_pos, torch.tensor(sinks, device=k_pos.device)))
    for i0 in range(0, q_pos.shape[0], QUERY_BLOCK):
        qs = slice(i0, i0 + QUERY_BLOCK)
        qb = q_pos[qs]
        lo = int(torch.searchsorted(k_pos, qb[0] - window + 1))
        hi = int(torch.searchsorted(k_pos, qb[-1], right=True))
        if lo <= n_sink:
            ks = slice(0, hi)
        else:
            ks = torch.cat([torch.arange(n_sink, device=k_pos.device), torch.arange(lo, hi, device=k_pos.device)])
        seen = visible(qb, k_pos[ks])
        mask = _additive(seen, dtype)
        if bias is not None:
            mask = mask + bias(qb, k_pos[ks]).to(dtype)
        plan.append((qs, ks, mask, int(seen.sum())))
    return plan
