"""KV Cache Skipping: fewer K/V entries written and read, without ever zeroing keys.

Two sources of skipped entries (QuickSilver, arXiv 2506.22396, Sec. 3.2, made precise):

1. Tokens that do not compute layer l (halted). ``policy="propagate"`` (CALM, Schuster
   et al. 2022) computes their K/V at l from the carried state, costing only the K/V
   projections; ``policy="skip"`` writes nothing, and later queries attend only to the
   entries that exist (excluded by construction, not by zeroed keys, which would still
   take softmax mass).
2. Entries a query does not need: every query keeps the first ``sink_tokens`` keys
   (attention sinks, Xiao et al. 2023, StreamingLLM) and its ``recent_window`` most recent
   keys; older entries are skipped. Visibility depends only on positions, so it is causal.
3. Entries an importance rule ranks low (``selection``, see ``kv_select``): each query reads
   the sinks, its recent window and the best of the older keys, up to ``keep_fraction`` of
   its past; each KV head ranks and keeps its own older keys. Scores come from keys and
   from queries at or before the reading query only.

RoPE positions stay the true positions in every case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QuicksilverError
from . import kv_select
from ._checks import check_choice, check_range
from .kv_rules import RULES, KVRule

POLICIES = ("propagate", "skip")
SELECTIONS = tuple(RULES)  # window, knorm, h2o, tova, snapkv, quest
# Importance rules without an explicit recent window still keep this many recent keys.
DEFAULT_RECENT = 64


@dataclass
class KVCacheSkipping:
    """Settings of KV Cache Skipping.

    Parameters
    ----------
    enabled : bool, default False
    policy : {"propagate", "skip"}, default "propagate"
        K/V of a token at a layer it does not compute: from its carried state, or none.
    sink_tokens : int, default 4
        The first keys every query always sees.
    recent_window : int or None, default None
        Each query also sees its last ``recent_window`` keys (itself included); None keeps all.
    layers_from : int, default 0
        The recent-window rule applies from this layer on (earlier layers keep every key).
    selection : {"window", "knorm", "h2o", "tova", "snapkv", "quest"}, default "window"
        Which older keys a query reads beyond the sinks and its recent window.
        ``window``: none (StreamingLLM). ``knorm``: lowest key norms (KnormPress, Devoto et
        al. 2024). ``h2o``: most attention accumulated from past queries (Zhang et al. 2023).
        ``tova``: most attention from the latest query (Oren et al. 2024). ``snapkv``: most
        attention from the latest ``observation`` queries (Li et al. 2024). ``quest``: the
        key pages whose min/max summaries bound the query's scores highest (Tang et al. 2024);
        pages are read, not dropped. The eviction rules (all but window and quest) compress a
        generation cache after prefill to ``keep_fraction`` of the prompt and keep it there.
    keep_fraction : float, default 0.25
        For the importance rules: share of its past (sinks and recent window included) that
        each query reads, and share of the sequence that a generation cache keeps. A call
        that extends a cache (a question after its context) reads its own tokens in full and
        this share of the positions before it.
    min_keys : int, default 0
        For the importance rules: each query reads at least this many keys (a token budget, as
        Quest's), so a context up to ``min_keys`` tokens is read in full and ``keep_fraction``
        applies beyond it; a generation cache keeps at least this many entries.
    page_size : int, default 16
        Keys per page of ``quest``.
    block_pages : int or None, default None
        ``quest``: keys per page when a block of queries that starts a sequence chooses (a
        prefill, a teacher-forced pass of more than ``attention.QUEST_PER_QUERY`` tokens) and
        when a decode step chooses, a multiple of ``page_size``; queries appended to a cache
        (a question after its context, a continuation after its prefix) choose each query's
        pages of ``page_size`` keys. None: ``page_size`` everywhere. Small pages choose more
        precisely, large ones cost less to score: a decode step scoring 2-key pages of a
        7,680-token cache read more summary bytes than the cache itself and ran at 0.93x
        ``off``; on 16-key blocks it runs at 1.31x, at a cost (a continuation scored per query
        on 16-key pages +2.75% perplexity, on 2-key pages +0.72%; docs/RESULTS.md "Long context").
    dense_prefill : bool, default False
        For the importance rules: a call that starts a sequence (a prompt's prefill, a
        teacher-forced pass) reads every key, and only text appended to a cache (a question,
        a continuation) and decode steps select, as Quest itself does (a decode-time method;
        kvpress's presses likewise compress after an exact prefill). The context's hidden
        states are then exact and a teacher-forced pass equals the stock model; the prefill
        saves no time.
    observation : int, default 16
        Latest queries whose attention scores keys for ``h2o``, ``snapkv`` and ``quest``.
    """

    enabled: bool = False
    policy: str = "propagate"
    sink_tokens: int = 4
    recent_window: int | None = None
    layers_from: int = 0
    selection: str = "window"
    keep_fraction: float = 0.25
    min_keys: int = 0
    page_size: int = 16
    block_pages: int | None = None
    dense_prefill: bool = False
    observation: int = 16

    def __post_init__(self):
        check_choice("kv", "policy", self.policy, POLICIES)
        check_range("kv", "sink_tokens", self.sink_tokens, 0, integer=True)
        check_range("kv", "recent_window", self.recent_window, 1, integer=True, allow_none=True)
        check_range("kv", "layers_from", self.layers_from, 0, integer=True)
        check_choice("kv", "selection", self.selection, SELECTIONS)
        check_range("kv", "keep_fraction", self.keep_fraction, 0.0, 1.0)
        if self.keep_fraction <= 0:
            check_range("kv", "keep_fraction", self.keep_fraction, 1e-6, 1.0)
        check_range("kv", "min_keys", self.min_keys, 0, integer=True)
        check_range("kv", "page_size", self.page_size, 1, integer=True)
        check_range("kv", "block_pages", self.block_pages, 1, integer=True, allow_none=True)
        if self.block_pages is not None and self.block_pages % self.page_size:
            raise QuicksilverError(f"kv.block_pages must be a multiple of kv.page_size ({self.page_size}), got {self.block_pages}")
        check_range("kv", "observation", self.observation, 1, integer=True)

    @property
    def rule(self) -> KVRule:
        """The selection rule (``kv_rules``), whose attributes say what it does."""
        return RULES[self.selection]

    def selects(self, layer: int) -> bool:
        """Whether an importance rule picks older keys at ``layer``."""
        return self.enabled and self.rule.selects and layer >= self.layers_from

    def evicts(self, layer: int) -> bool:
        """Whether a generation cache drops low-ranked entries at ``layer`` (quest only reads fewer)."""
        return self.selects(layer) and self.rule.evicts

    def recent_at(self, layer: int) -> int:
        """The recent window of an importance rule at ``layer``."""
        return self.recent_window if self.recent_window is not None else DEFAULT_RECENT

    def reach(self) -> int | None:
        """The shortest context (tokens) at which a query reads fewer keys than its past (None: never).

        Window: the first query past the sinks and the window. Importance rules: in
        generation (one query at a time), the first query with a key older than its sinks
        and recent window whose budget is smaller than its past; teacher-forced passes run
        queries in blocks (``attention.QUERY_BLOCK``) and start skipping in a later block.
        """
        if not self.enabled:
            return None
        if not self.rule.selects:
            return None if self.recent_window is None else self.sink_tokens + self.recent_window + 1
        if self.keep_fraction >= 1:
            return None
        # A decode step reads itself and the floor's worth of the keys before it: it first skips one with min_keys + 1 before it.
        n = max(self.sink_tokens + self.recent_at(self.layers_from) + 1, self.min_keys + 2 if self.min_keys else 0)
        while kv_select.budget(self.keep_fraction, n - 1, self.min_keys) >= n:
            n += 1
        return n

    def window_at(self, layer: int) -> int | None:
        """The position-only recent window that applies at ``layer`` (None: every past key).

        Importance rules apply their window in ``attention.attend_selected`` instead.
        """
        if not self.enabled or self.recent_window is None or layer < self.layers_from or self.rule.selects:
            return None
        return self.recent_window

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor, layer: int) -> torch.Tensor:
        """Pure rule: which keys each query sees; (Tq,), (Tk,) -> bool (Tq, Tk)."""
        qp, kp = q_pos[:, None], k_pos[None, :]
        seen = kp <= qp
        window = self.window_at(layer)
        if window is not None:
            seen &= (kp < self.sink_tokens) | (qp - kp < window)
        return seen
