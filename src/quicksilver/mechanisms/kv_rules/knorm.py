"""KnormPress (Devoto et al. 2024): keep the keys of lowest L2 norm."""

from __future__ import annotations

from .. import kv_select
from .base import Block, KVRule


class KeyNorm(KVRule):
    name = "knorm"

    def static_scores(self, k):
        return kv_select.knorm_scores(k)

    def scores(self, b: Block):
        return b.static[b.n_sink : b.lo]

    def compress_scores(self, q, q_pos, k, k_pos, scale, n_sink, lo, observation):
        return kv_select.knorm_scores(k[n_sink:lo])
