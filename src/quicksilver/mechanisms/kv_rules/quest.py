"""Quest (Tang et al. 2024): read the key pages whose min/max summaries bound the query's scores highest.

Pages are read, not dropped: a generation cache keeps every entry, and a decode step reads the
best pages of it (``kv_select.PageSummaries`` keeps the summaries beside the cache).
"""

from __future__ import annotations

import torch

from .. import kv_select
from .base import Block, KVRule


class Quest(KVRule):
    name = "quest"
    evicts = False
    reads_pages = True

    def middle(self, b: Block) -> torch.Tensor:
        dev, hkv, page = b.k.device, b.k.shape[1], b.page
        if b.room <= 0:
            return torch.empty(hkv, 0, dtype=torch.long, device=dev)
        n_pages = (b.lo - b.n_sink) // page  # whole pages below the recent range; a partial rest is always read
        rest = kv_select.per_head(torch.arange(b.n_sink + n_pages * page, b.lo, device=dev), hkv)
        n_pick = (b.room - rest.shape[1]) // page
        if n_pick <= 0 or n_pages == 0:
            return rest
        obs = slice(max(0, b.i0 + 1 - b.observation), b.i0 + 1)  # the block's first query and the ones before it
        scores = kv_select.quest_page_scores(b.q[obs], b.kmin[:, :n_pages], b.kmax[:, :n_pages], b.scale)  # (P, Hkv)
        pages = kv_select.top_index(scores, n_pick, ordered=False)  # (Hkv, n_pick), in any order
        picked = (pages[:, :, None] * page + torch.arange(page, device=dev)).flatten(1) + b.n_sink
        return torch.cat([picked, rest], dim=1)
