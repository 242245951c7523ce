"""Causal attention over a varying set of keys, computed only where it is needed.

Four paths, one meaning (``visible(q_pos, k_pos)`` says which keys each query sees):
- every row computes and sees its whole past: one SDPA call with ``is_causal``;
- arbitrary subsets without a window: one SDPA call with a boolean mask;
- a recent window (plus sinks): queries in blocks, each block gathering only the keys
  it can see (sinks + a contiguous recent range), so skipped keys cost no time;
- an importance rule (``attend_selected``): each query block gathers the sinks, its
  recent range and the older keys the rule ranks best in each KV head, scored from the
  past only.
Excluded keys never enter the softmax: masks are boolean, keys are never zeroed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .attn_kernels import causal_attention, decode_attention
from .mechanisms import kv_select
from .mechanisms.kv_rules import Block

QUERY_BLOCK = 128
QUEST_PER_QUERY = 32  # up to this many queries, quest chooses pages per query even when they start a sequence


def _sdpa(q, k, v, scale, mask=None, is_causal=False):
    # q (Tq, H, hd), k/v (Tk, Hkv, hd) -> (Tq, H*hd); SDPA wants (1, heads, T, hd).
    if q.shape[0] == 1 and not is_causal and (mask is None or mask.dim() == 2):  # one decode query: the kernel measured fastest
        return decode_attention(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, scale)
    if is_causal and mask is None and q.shape[0] == k.shape[0]:  # a prefill: the kernel measured fastest
        return causal_attention(q, k, v, scale)
    # mask: (Tq, Tk) for every head, or (Hkv, Tq, Tk) per KV head (repeated over its query heads).
    if mask is not None and mask.dim() == 3:
        mask = mask.repeat_interleave(q.shape[1] // mask.shape[0], dim=0)[None]
    elif mask is not None:
        mask = mask[None, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def _sdpa_heads(q, kh, vh, scale, mask):
    """Like ``_sdpa`` with head-major keys and values kh/vh (Hkv, Tk, hd), as a per-head gather leaves them."""
    if mask.dim() == 3:
        mask = mask.repeat_interleave(q.shape[1] // mask.shape[0], dim=0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kh[None], vh[None], attn_mask=mask[None] if mask.dim() == 3 else mask[None, None],
                                         scale=scale, enable_gqa=q.shape[1] != kh.shape[0])
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


def attend_selected(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    kv,
    bias: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    return_mask: bool = False,
    pages: kv_select.PageSummaries | None = None,
    own_window: int | None = None,
):
    """Attention where each query block reads sinks + its recent range + the best older keys, per KV head.

    ``kv`` is the KVCacheSkipping settings (``selection``, ``keep_fraction``, ``sink_tokens``,
    recent window, ``page_size``, ``block_pages``, ``observation``). A block whose first query sits at p0
    reads ``kv_select.budget(keep_fraction, p0, min_keys)`` keys in each KV head: the sinks, every key
    from p0 - W + 1 on (causally), and the older ones that head ranks best. Older keys are
    ranked only from keys before p0 and from queries at or before p0 (the block's first row
    and earlier rows), so no query depends on a later token. A call that extends a cache
    (keys before its first query: a question after its context, a continuation after its
    prefix, a decode step) reads its own keys in full, causally, and ``keep_fraction`` of
    the positions before it (sinks and recent keys among them), as an eviction rule's
    extension reads its compressed cache and itself: the context is compressed, the text
    that follows it is not. ``own_window`` is the model's own sliding window at this layer
    (Mistral, Gemma-3's local layers): a query never reads a key ``own_window`` or more
    positions back, whatever the rule chose (sinks included). ``pages`` keeps quest's page
    summaries between calls on a growing cache (a decode step summarizes only a page it
    completed). Returns (Tq, H*hd), pairs seen per head, and with ``return_mask`` the
    (Hkv, Tq, Tk) visibility it used (for the masked reference path).
    """
    tq, tk, dev, hkv = q.shape[0], k.shape[0], k.device, k.shape[1]
    rule, window, page, m = kv.rule, kv.recent_at(0), kv.page_size, kv.observation
    n_sink = int(torch.searchsorted(k_pos, kv.sink_tokens))
    static = rule.static_scores(k)
    kmin = kmax = None
    if rule.reads_pages:
        pages = pages or kv_select.PageSummaries(page, (kv.block_pages or page) // page)
        kmin, kmax = pages.update(k, k_pos, n_sink)
    acc = torch.zeros(tk, hkv, device=dev) if rule.accumulates else None
    outs, pairs = [], 0
    full = torch.zeros(hkv, tq, tk, dtype=torch.bool, device=dev) if return_mask else None
    heads = torch.arange(hkv, device=dev)
    start = int(torch.searchsorted(k_pos, q_pos[0]))  # keys before this call's first query: a cache it extends
    prior = kv_select.budget(kv.keep_fraction, int(q_pos[0]) - 1, kv.min_keys) if start > n_sink else None  # kept of the positions before the call
    # Quest on queries that extend a cache (a question, a continuation, a decode step) or on a short
    # run of them: each query picks its own pages, as it would generating token by token. A block
    # of queries choosing together from its first query's scores (a prefill's speed) cost a
    # continuation +4.18% perplexity against +0.72% choosing per query (news calibration, 25%).
    step = 1 if rule.reads_pages and (tq <= QUEST_PER_QUERY or prior is not None) else QUERY_BLOCK
    if rule.reads_pages and pages.coarse > 1 and (step > 1 or tq == 1):  # blocks of queries and decode steps: block pages
        kmin, kmax = pages.blocks()
        page = kv.block_pages
    for i0 in range(0, tq, step):
        qs = slice(i0, i0 + step)
        qb = q_pos[qs]
        p0, p1 = int(qb[0]), int(qb[-1])
        before = int(torch.searchsorted(k_pos, p0))  # keys strictly before the block's first query
        lo = max(n_sink, int(torch.searchsorted(k_pos, p0 - window + 1)))
        hi = int(torch.searchsorted(k_pos, p1, right=True))
        if acc is not None and i0 > 0:  # h2o: the previous block's last queries add their attention
            acc[:before] += kv_select.attention_scores(q[max(0, i0 - m):i0], q_pos[max(0, i0 - m):i0], k[:before], k_pos[:before], scale)
        if prior is None:
            room = kv_select.budget(kv.keep_fraction, p0, kv.min_keys) - n_sink - (int(torch.searchsorted(k_pos, p0, right=True)) - lo)
        else:  # an extension: its own keys in full, the budget over the keys before it
            lo = max(n_sink, min(lo, start))
            room = prior - n_sink - (start - lo)
        if lo > n_sink and room < lo - n_sink:  # older keys exist (not for a query among the sinks) and do not all fit
            middle = rule.middle(Block(q, q_pos, i0, k, k_pos, n_sink, lo, before, room, scale, m, static, acc, kmin, kmax, page))
            ks = torch.cat([kv_select.per_head(torch.arange(n_sink, device=dev), hkv), middle,
                            kv_select.per_head(torch.arange(lo, hi, device=dev), hkv)], dim=1)  # (Hkv, n)
            kb, vb = _gather_heads(k, ks), _gather_heads(v, ks)  # (Hkv, n, hd)
            kp = k_pos[ks[0]]  # the heads differ only in older keys, all before p0: one causal mask serves all
        else:  # every older key fits: one contiguous range shared by all heads
            ks = slice(0, hi)
            kb, vb, kp = k[ks].transpose(0, 1), v[ks].transpose(0, 1), k_pos[ks]
        seen = kp[None, :] <= qb[:, None]  # sinks and older keys lie before p0; the recent range is causal
        if own_window is not None:  # the family's own window bounds whatever the rule chose
            seen &= qb[:, None] - kp[None, :] < own_window
        mask = _additive(seen, q.dtype)
        if bias is not None:
            b = bias(qb, k_pos[ks]) if isinstance(ks, slice) else torch.stack([bias(qb, k_pos[ks[h]]) for h in range(hkv)])
            mask = mask + b.to(q.dtype)  # (Tq, n) or per head (Hkv, Tq, n)
        if bias is None and q[qs].shape[0] == 1 and bool(seen.all()):  # one query reading all it gathered: the decode kernel
            outs.append(decode_attention(q[qs], kb[None], vb[None], None, scale))
        else:
            outs.append(_sdpa_heads(q[qs], kb, vb, scale, mask))
        pairs += int(seen.sum())
        if full is not None:
            if isinstance(ks, slice):
                full[:, qs, ks] = seen
            else:
                full[heads[:, None, None], torch.arange(tq, device=dev)[qs][None, :, None], ks[:, None, :]] = seen
    return torch.cat(outs), pairs, full


def _gather_heads(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (Hkv, n) of each head of ``x`` (Tk, Hkv, hd) -> (Hkv, n, hd).

    One row gather per head: a generation cache is stored head-major, so ``x`` is a
    transposed view there, and reshaping it to index all heads at once would copy the whole
    cache every layer and step (advanced indexing over both dims is slower still).
    """
    out = x.new_empty((x.shape[1], index.shape[1], x.shape[2]))
    for h in range(x.shape[1]):
        torch.index_select(x[:, h], 0, index[h], out=out[h])
    return out
