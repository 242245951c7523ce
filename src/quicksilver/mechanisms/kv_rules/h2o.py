"""H2O (Zhang et al. 2023): keep the heavy hitters, the keys with the most attention accumulated from past queries."""

from __future__ import annotations

from .. import kv_select
from .base import Block, KVRule


class HeavyHitters(KVRule):
    """Attention accumulates over the blocks of a call (``Block.acc``); a cache is compressed by
    the attention of up to ``kv_select.H2O_PREFILL_QUERIES`` latest queries."""

    name = "h2o"
    accumulates = True

    def scores(self, b: Block):
        return b.acc[b.n_sink : b.lo]

    def compress_queries(self, observation: int) -> int:
        return kv_select.H2O_PREFILL_QUERIES
