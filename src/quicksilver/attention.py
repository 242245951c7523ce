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

QUERY_BLOCK = 256


def _sdpa(q, k, v, scale, mask=None, is_causal=False):
    # q (Tq, H, hd), k/v (Tk, Hkv, hd) -> (Tq, H*hd); SDPA wants (1, heads, T, hd).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=None if mask is None else mask[None, None], is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


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
) -> tuple[torch.Tensor, int]:
    """Attention output (Tq, H*hd) and the number of (query, key) pairs actually seen.

    ``q_pos`` and ``k_pos`` are sorted true positions. ``full_causal`` says that queries
    and keys are the same complete sequence with no window (the fast path).
    """
    tq = q.shape[0]
    if full_causal:
        return _sdpa(q, k, v, scale, is_causal=tq > 1), tq * (tq + 1) // 2
    if window is None:
        mask = visible(q_pos, k_pos)
        return _sdpa(q, k, v, scale, mask=mask), int(mask.sum())
    outs, pairs = [], 0
    n_sink = int(torch.searchsorted(k_pos, torch.tensor(sinks, device=k_pos.device)))
    for i0 in range(0, tq, QUERY_BLOCK):
        qb = q_pos[i0 : i0 + QUERY_BLOCK]
        lo = int(torch.searchsorted(k_pos, qb[0] - window + 1))
        hi = int(torch.searchsorted(k_pos, qb[-1], right=True))
        if lo <= n_sink:
            idx = slice(0, hi)
            kb, vb, kp = k[idx], v[idx], k_pos[idx]
        else:
            sel = torch.cat([torch.arange(n_sink, device=k.device), torch.arange(lo, hi, device=k.device)])
            kb, vb, kp = k[sel], v[sel], k_pos[sel]
        mask = visible(qb, kp)
        outs.append(_sdpa(q[i0 : i0 + QUERY_BLOCK], kb, vb, scale, mask=mask))
        pairs += int(mask.sum())
    return torch.cat(outs), pairs
