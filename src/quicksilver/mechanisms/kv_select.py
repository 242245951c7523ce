"""Importance rules of KV Cache Skipping: which older keys a query reads, from the past only.

Pure scoring functions on tensors (keys (Tk, Hkv, hd), queries (To, H, hd), true
positions); the attention primitive (``attention.attend_selected``) gathers what they
pick and the engine drops from a generation cache what they rank lowest
(``compress_index``). Each KV head chooses its own older keys (as kvpress, SnapKV and H2O
do): a retrieval head keeps the keys it attends to even when the other heads rank them low.
Scores of the query heads that share a KV head (grouped-query attention) are averaged, or
maxed for Quest's bounds. Every head reads the same number of keys, and the sinks and the
recent window are shared. A query never uses a score from a query or key after itself: that
is what keeps teacher-forced evaluation causal.
"""

from __future__ import annotations

import math

import torch

# Queries of a prompt whose attention ranks keys at the end of a prefill (h2o accumulates over them).
H2O_PREFILL_QUERIES = 256


def budget(keep_fraction: float, position: int, floor: int = 0) -> int:
    """Keys a query at ``position`` reads (sinks and recent window included): ``keep_fraction`` of its
    past, but at least ``floor`` keys (all of a past that short)."""
    return min(position + 1, max(math.ceil(keep_fraction * (position + 1)), floor))


def knorm_scores(k: torch.Tensor) -> torch.Tensor:
    """(Tk, Hkv, hd) -> (Tk, Hkv): minus each head's key norm (KnormPress keeps low norms)."""
    return -k.float().norm(dim=-1)


def attention_scores(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """(Tk, Hkv) attention probability mass each key gets from the queries ``q`` (To, H, hd),
    summed over queries and averaged over the query heads that share a KV head (as kvpress
    does under grouped-query attention); a query spreads its mass over keys at or before it."""
    h, hkv = q.shape[1], k.shape[1]
    qg = q.float().view(q.shape[0], hkv, h // hkv, q.shape[2])  # (To, Hkv, g, hd)
    s = torch.einsum("okgd,tkd->kgot", qg, k.float()) * scale  # (Hkv, g, To, Tk)
    s = s.masked_fill(k_pos[None, None, None, :] > q_pos[None, None, :, None], float("-inf"))
    return s.softmax(dim=-1).sum(dim=2).mean(dim=1).T


class PageSummaries:
    """Elementwise min and max of each full page of keys, computed once per page and kept.

    Quest's summaries of a growing cache: each call summarizes only the pages completed
    since the last call (a decode step adds at most one). A cache that was truncated or
    compacted below what was summarized is noticed (entry count and the position of the
    last summarized key) and summarized again from its start.

    Parameters
    ----------
    page : int
        Keys per page.
    coarse : int, default 1
        Pages per block of ``blocks`` (kept too, extended as pages complete).
    """

    def __init__(self, page: int, coarse: int = 1):
        self.page = page
        self.coarse = coarse
        self.start = -1
        self.n_pages = 0
        self.n_blocks = 0
        self.last_pos = -1
        # Head-major (Hkv, capacity, hd) float32, so scoring is one batched matmul per bound without a copy.
        self.kmin: torch.Tensor | None = None
        self.kmax: torch.Tensor | None = None
        self.cmin: torch.Tensor | None = None  # the same for blocks of ``coarse`` pages (``blocks``)
        self.cmax: torch.Tensor | None = None

    def update(self, k: torch.Tensor, k_pos: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summaries (Hkv, P, hd) of the full pages of ``k[start:]`` (a partial last page is left out)."""
        page = self.page
        full = (k.shape[0] - start) // page
        if start != self.start or self.n_pages > full or (self.n_pages and int(k_pos[start + self.n_pages * page - 1]) != self.last_pos):
            self.start, self.n_pages, self.n_blocks = start, 0, 0  # a different cache or one changed below the summaries
        shape = (k.shape[1], k.shape[2], k.device)
        self.kmin, self.kmax = _room(self.kmin, full, self.n_pages, *shape), _room(self.kmax, full, self.n_pages, *shape)
        if full > self.n_pages:
            new = k[start + self.n_pages * page : start + full * page].float().view(full - self.n_pages, page, *k.shape[1:])
            self.kmin[:, self.n_pages : full] = new.amin(dim=1).transpose(0, 1)
            self.kmax[:, self.n_pages : full] = new.amax(dim=1).transpose(0, 1)
            self.n_pages = full
            self.last_pos = int(k_pos[start + full * page - 1])
        return self.kmin[:, :full], self.kmax[:, :full]

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Summaries (Hkv, B, hd) of the whole blocks of ``coarse`` pages among those ``update`` summarized.

        Each block is summarized once, from its pages' summaries, when its last page completes.
        """
        f, full = self.coarse, self.n_pages // self.coarse  # update() resets n_blocks whenever it resets its pages
        shape = (self.kmin.shape[0], self.kmin.shape[2], self.kmin.device)
        self.cmin, self.cmax = _room(self.cmin, full, self.n_blocks, *shape), _room(self.cmax, full, self.n_blocks, *shape)
        if full > self.n_blocks:
            new = slice(self.n_blocks * f, full * f)
            self.cmin[:, self.n_blocks : full], self.cmax[:, self.n_blocks : full] = coarser_pages(self.kmin[:, new], self.kmax[:, new], f)
            self.n_blocks = full
        return self.cmin[:, :full], self.cmax[:, :full]


def _room(buf: torch.Tensor | None, need: int, keep: int, heads: int, dim: int, device) -> torch.Tensor:
    """``buf`` (heads, capacity, dim) float32 with room for ``need`` rows, its first ``keep`` rows kept (grown 2x when short)."""
    if buf is not None and buf.shape[1] >= need:
        return buf
    out = torch.empty((heads, max(need, 2 * (buf.shape[1] if buf is not None else 0), 16), dim), dtype=torch.float32, device=device)
    if keep:
        out[:, :keep] = buf[:, :keep]
    return out


def coarser_pages(kmin: torch.Tensor, kmax: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summaries (Hkv, P // factor, hd) of pages ``factor`` times as long, from those of the pages they join.

    A partial group at the end is left out (its keys are then a partial page, always read, as
    keys past the last full page are).
    """
    hkv, p, hd = kmin.shape
    n = p // factor * factor
    return (kmin[:, :n].reshape(hkv, -1, factor, hd).amin(dim=2), kmax[:, :n].reshape(hkv, -1, factor, hd).amax(dim=2))


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, scale: float) -> torch.Tensor:
    """(P, Hkv) how much attention each page may get from the queries ``q`` (To, H, hd).

    ``kmin``/``kmax`` are head-major page summaries (Hkv, P, hd). Quest's upper bound of q.k
    over a page, sum_d max(q_d min_d, q_d max_d), written as two batched matrix products
    (positive parts of q against the maxima, negative parts against the minima), turned into
    a per-query-head softmax over pages, then the max over queries and over the query heads
    that share a KV head (a page one head needs is kept for it).
    """
    h, hkv = q.shape[1], kmin.shape[0]
    qg = q.float().view(q.shape[0], hkv, h // hkv, q.shape[2]).transpose(0, 1).reshape(hkv, -1, q.shape[2])  # (Hkv, To*g, hd)
    bound = torch.baddbmm(torch.bmm(qg.clamp(min=0), kmax.transpose(1, 2)), qg.clamp(max=0), kmin.transpose(1, 2)).mul_(scale)
    return bound.softmax(dim=-1).amax(dim=1).T  # (P, Hkv)


def top_index(scores: torch.Tensor, n: int, ordered: bool = True) -> torch.Tensor:
    """Indices of the ``n`` highest scores, in increasing order: (T,) -> (n,), or per head (T, Hkv) -> (Hkv, n).

    ``ordered=False`` (per head only) leaves them in any order: attention over a gathered set
    does not depend on its order, and sorting cost a decode step of quest on small pages a
    tenth of its selection time.
    """
    if scores.dim() == 2:
        if n >= scores.shape[0]:
            return torch.arange(scores.shape[0], device=scores.device).expand(scores.shape[1], -1)
        if not ordered:
            return torch.topk(scores.T, n, dim=1, sorted=False).indices
        return torch.topk(scores.T, n, dim=1).indices.sort(dim=1).values
    if n >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    return torch.topk(scores, n).indices.sort().values


def per_head(index: torch.Tensor, heads: int) -> torch.Tensor:
    """A shared index (n,) as the same index for every head (heads, n); a per-head one unchanged."""
    return index.expand(heads, -1) if index.dim() == 1 else index


def compress_index(
    rule,
    keep_fraction: float,
    k: torch.Tensor,
    k_pos: torch.Tensor,
    q: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    sinks: int,
    recent: int,
    observation: int,
    slack: int = 0,
    floor: int = 0,
) -> torch.Tensor | None:
    """Entries of a cache to keep after its queries ``q`` ran, per KV head (Hkv, m) (None: keep all).

    Keeps the sinks, the keys the next query's recent window covers and the best-ranked
    older keys, ``keep_fraction`` of the positions in all; each KV head ranks the older keys
    by its own scores (the same count for every head), as the evicting ``rule`` scores them
    (``kv_rules``: key norms, the latest query's attention, the latest ``observation`` queries',
    or the attention summed over up to ``H2O_PREFILL_QUERIES`` latest queries). Nothing is
    dropped until the cache exceeds its target by more than ``slack``; the target is never below
    ``floor`` entries.
    """
    n = k.shape[0]
    next_pos = int(q_pos[-1]) + 1
    target = budget(keep_fraction, next_pos, floor) - 1  # the next query reads the cache and itself
    if n <= target + slack:
        return None
    n_sink = int(torch.searchsorted(k_pos, sinks))
    lo = max(n_sink, int(torch.searchsorted(k_pos, next_pos - recent + 1)))
    room = target - n_sink - (n - lo)
    if room >= lo - n_sink:
        return None
    dev, hkv = k.device, k.shape[1]
    if room > 0:
        scores = rule.compress_scores(q, q_pos, k, k_pos, scale, n_sink, lo, observation)
        middle = top_index(scores, room) + n_sink  # (Hkv, room)
    else:
        middle = torch.empty(hkv, 0, dtype=torch.long, device=dev)
    return torch.cat([per_head(torch.arange(n_sink, device=dev), hkv), middle.to(dev), per_head(torch.arange(lo, n, device=dev), hkv)], dim=1)


def compress_cache(cache, layer: int, kv, q: torch.Tensor, q_pos: torch.Tensor, scale: float, slack: int) -> None:
    """Drop the entries of ``cache`` at ``layer`` that the evicting rule of ``kv`` ranks lowest (prefill: to its target at once)."""
    e = cache.get(layer)
    index = compress_index(kv.rule, kv.keep_fraction, e.k, e.pos, q, q_pos, scale, kv.sink_tokens, kv.recent_at(layer),
                           kv.observation, slack, kv.min_keys)
    if index is not None:
        cache.keep(layer, index)


def pages_of(cache, layer: int, kv) -> PageSummaries:
    """The page summaries kept beside ``cache`` at ``layer`` for ``kv``'s pages (made anew for another engine's pages)."""
    coarse = (kv.block_pages or kv.page_size) // kv.page_size
    pages = cache.pages[layer]
    if pages is None or (pages.page, pages.coarse) != (kv.page_size, coarse):
        pages = cache.pages[layer] = PageSummaries(kv.page_size, coarse)
    return pages
