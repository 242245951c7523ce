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

RoPE positions stay the true positions in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_choice, check_range

POLICIES = ("propagate", "skip")


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
    """

    enabled: bool = False
    policy: str = "propagate"
    sink_tokens: int = 4
    recent_window: int | None = None
    layers_from: int = 0

    def __post_init__(self):
        check_choice("kv", "policy", self.policy, POLICIES)
        check_range("kv", "sink_tokens", self.sink_tokens, 0, integer=True)
        check_range("kv", "recent_window", self.recent_window, 1, integer=True, allow_none=True)
        check_range("kv", "layers_from", self.layers_from, 0, integer=True)

    def window_at(self, layer: int) -> int | None:
        """The recent window that applies at ``layer`` (None: every past key)."""
        if not self.enabled or self.recent_window is None or layer < self.layers_from:
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
