"""The interface every KV selection rule implements, and the plumbing they share.

A rule answers "which older keys does this query block read" (beyond the sinks and its recent
window, which every rule keeps) from the past only, and, for the rules that evict, which
entries a generation cache keeps. What a rule can do is declared as attributes, so the
attention primitive and the engine never compare rule names (kvpress keeps one press per file
the same way: the base class holds the plumbing, a rule implements its scoring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import kv_select


@dataclass
class Block:
    """One query block's choice: keys [n_sink, lo) are the older ones, ``room`` of them fit.

    q (Tq, H, hd) and q_pos are the call's queries (the block starts at row ``i0``); k (Tk, Hkv, hd)
    and k_pos the keys; ``before`` keys lie strictly before the block's first query. ``static``,
    ``acc``, ``kmin``/``kmax`` and ``page`` are what the rule prepared for the call (``prepare``).
    """

    q: torch.Tensor
    q_pos: torch.Tensor
    i0: int
    k: torch.Tensor
    k_pos: torch.Tensor
    n_sink: int
    lo: int
    before: int
    room: int
    scale: float
    observation: int
    static: torch.Tensor | None = None
    acc: torch.Tensor | None = None
    kmin: torch.Tensor | None = None
    kmax: torch.Tensor | None = None
    page: int = 1


class KVRule:
    """A KV selection rule. Subclasses set the capability attributes and implement ``scores``.

    Attributes
    ----------
    name : the ``kv.selection`` value that picks it
    selects : picks older keys beyond the sinks and the recent window (False: a position window)
    evicts : a generation cache drops the entries it ranks lowest (``compress_index``)
    reads_pages : reads the best pages of a cache that keeps every entry (Quest's page summaries)
    compresses_appended : an evicting rule compresses again after text appended to a cache
        (SnapKV compresses prompts only)
    accumulates : scores accumulate over the queries of a call (H2O)
    """

    name: ClassVar[str] = "?"
    selects: ClassVar[bool] = True
    evicts: ClassVar[bool] = True
    reads_pages: ClassVar[bool] = False
    compresses_appended: ClassVar[bool] = True
    accumulates: ClassVar[bool] = False

    def static_scores(self, k: torch.Tensor) -> torch.Tensor | None:
        """Scores (Tk, Hkv) that depend on the keys alone, computed once per call (None: none)."""
        return None

    def scores(self, b: Block) -> torch.Tensor:
        """(lo - n_sink, Hkv) scores of the older keys for block ``b``; higher is kept."""
        raise NotImplementedError

    def middle(self, b: Block) -> torch.Tensor:
        """Indices (Hkv, n) of the older keys each KV head of the block reads (n <= room)."""
        if b.room <= 0:
            return torch.empty(b.k.shape[1], 0, dtype=torch.long, device=b.k.device)
        return kv_select.top_index(self.scores(b), b.room) + b.n_sink

    def compress_scores(self, q, q_pos, k, k_pos, scale: float, n_sink: int, lo: int, observation: int) -> torch.Tensor:
        """(lo - n_sink, Hkv) scores of a cache's older entries after its queries ``q`` ran."""
        m = self.compress_queries(observation)
        return kv_select.attention_scores(q[-m:], q_pos[-m:], k, k_pos, scale)[n_sink:lo]

    def compress_queries(self, observation: int) -> int:
        """How many of the latest queries score a cache when it is compressed."""
        return observation

    def __repr__(self) -> str:
        return f"<kv rule {self.name}>"


class LatestQueries(KVRule):
    """Older keys ranked by the attention the latest ``n`` queries before the block gave them."""

    def latest(self, observation: int) -> int:
        return observation

    def scores(self, b: Block) -> torch.Tensor:
        if b.i0 == 0:  # no earlier query in this call: rank by key norm
            return kv_select.knorm_scores(b.k[b.n_sink : b.lo])
        obs = slice(max(0, b.i0 - self.latest(b.observation)), b.i0)
        return kv_select.attention_scores(b.q[obs], b.q_pos[obs], b.k[: b.before], b.k_pos[: b.before], b.scale)[b.n_sink : b.lo]
