"""Importance rules of KV Cache Skipping: which older keys a query reads, from the past only.

Pure scoring functions on tensors (keys (Tk, Hkv, hd), queries (To, H, hd), true
positions); the attention primitive (``attention.attend_selected``) gathers what they
pick and the engine drops from a generation cache what they rank lowest
(``compress_index``). One choice per key is shared by every head (the cache stores one
position per entry), so scores are averaged over heads. A query never uses a score from a
query or key after itself: that is what keeps teacher-forced evaluation causal.
"""

from __future__ import annotations

import math

import torch

# Queries of a prompt whose attention ranks keys at the end of a prefill (h2o accumulates over them).
H2O_PREFILL_QUERIES = 256


def budget(keep_fraction: float, position: int) -> int:
    """Keys a query at ``position`` reads (sinks and recent window included)."""
    return math.ceil(keep_fraction * (position + 1))


def knorm_scores(k: torch.Tensor) -> torch.Tensor:
    """(Tk, Hkv, hd) -> (Tk,): minus the key norm, averaged over heads (KnormPress keeps low norms)."""
    return -k.float().norm(dim=-1).mean(dim=1)


def attention_scores(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """(Tk,) attention probability mass each key gets from the queries ``q`` (To, H, hd), summed
    over queries and averaged over heads; a query spreads its mass over keys at or before it."""
    h, hkv = q.shape[1], k.shape[1]
    kk = k.float().repeat_interleave(h // hkv, dim=1)  # (Tk, H, hd)
    s = torch.einsum("ohd,khd->hok", q.float(), kk) * scale  # (H, To, Tk)
    s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return s.softmax(dim=-1).sum(dim=1).mean(dim=0)


def page_summaries(k: torch.Tensor, start: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per page of ``page`` keys from index ``start`` on: elementwise min and max, (P, Hkv, hd) each.

    The last page may be partial; its summary covers the keys it has.
    """
    kk = k[start:].float()
    n = kk.shape[0]
    if n == 0:
        empty = kk.new_zeros((0, *kk.shape[1:]))
        return empty, empty
    pad = (-n) % page
    lo = torch.cat([kk, kk[-1:].expand(pad, -1, -1)]) if pad else kk
    lo = lo.view(-1, page, *kk.shape[1:])
    return lo.amin(dim=1), lo.amax(dim=1)


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, scale: float) -> torch.Tensor:
    """(P,) how much attention each page may get from the queries ``q`` (To, H, hd).

    Quest's upper bound of q.k over a page, sum_d max(q_d min_d, q_d max_d), turned into a
    per-head softmax over pages, then the max over queries and heads.
    """
    h, hkv = q.shape[1], kmin.shape[1]
    lo = kmin.repeat_interleave(h // hkv, dim=1)  # (P, H, hd)
    hi = kmax.repeat_interleave(h // hkv, dim=1)
    qf = q.float()[:, None]  # (To, 1, H, hd)
    bound = torch.maximum(qf * lo[None], qf * hi[None]).sum(-1) * scale  # (To, P, H)
    return bound.softmax(dim=1).amax(dim=0).amax(dim=-1)  # a page one head needs (a retrieval head) is kept


def top_index(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest scores, in increasing order."""
    if n >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    return torch.topk(scores, n).indices.sort().values


def compress_index(
    selection: str,
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
) -> torch.Tensor | None:
    """Entries of a cache to keep after its queries ``q`` ran (None: keep all).

    Keeps the sinks, the keys the next query's recent window covers and the best-ranked
    older keys, ``keep_fraction`` of the positions in all. Scores: key norms (knorm), the
    latest query's attention (tova), the latest ``observation`` queries' (snapkv), or the
    attention summed over up to ``H2O_PREFILL_QUERIES`` latest queries (h2o). Nothing is
    dropped until the cache exceeds its target by more than ``slack``.
    """
    n = k.shape[0]
    next_pos = int(q_pos[-1]) + 1
    target = budget(keep_fraction, next_pos) - 1  # the next query reads the cache and itself
    if n <= target + slack:
        return None
    n_sink = int(torch.searchsorted(k_pos, sinks))
    lo = max(n_sink, int(torch.searchsorted(k_pos, next_pos - recent + 1)))
    room = target - n_sink - (n - lo)
    if room >= lo - n_sink:
        return None
    if room > 0:
        if selection == "knorm":
            scores = knorm_scores(k[n_sink:lo])
        else:
            m = {"tova": 1, "snapkv": observation, "h2o": H2O_PREFILL_QUERIES}[selection]
            scores = attention_scores(q[-m:], q_pos[-m:], k, k_pos, scale)[n_sink:lo]
        middle = top_index(scores, room) + n_sink
    else:
        middle = torch.empty(0, dtype=torch.long, device=k.device)
    dev = k.device
    return torch.cat([torch.arange(n_sink, device=dev), middle.to(dev), torch.arange(lo, n, device=dev)])
