"""The engine's own KV cache: per sequence and per layer, only the entries that were written.

Tokens that KV skipping leaves without K/V at a layer get no entry there, and entries
that a recent window makes invisible to every future query are evicted, so the cache
really shrinks. Positions are stored beside the keys: RoPE used the true positions,
and visibility rules read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerKV:
    k: torch.Tensor  # (n, Hkv, hd), RoPE applied
    v: torch.Tensor  # (n, Hkv, hd)
    pos: torch.Tensor  # (n,) true positions, increasing


@dataclass
class SequenceCache:
    """One sequence's cache: ``layers[l]`` holds the entries written at layer l."""

    n_layers: int
    layers: list = field(default_factory=list)
    length: int = 0  # positions consumed so far (the next token's position)
    peak_bytes: int = 0

    def __post_init__(self):
        if not self.layers:
            self.layers = [None] * self.n_layers

    def get(self, layer: int) -> LayerKV | None:
        return self.layers[layer]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        old = self.layers[layer]
        if old is None:
            self.layers[layer] = LayerKV(k, v, pos)
        else:
            self.layers[layer] = LayerKV(torch.cat([old.k, k]), torch.cat([old.v, v]), torch.cat([old.pos, pos]))

    def evict(self, layer: int, next_pos: int, window: int, sinks: int) -> None:
        """Drop entries no query at ``next_pos`` or later can see (outside sinks and the window)."""
        e = self.layers[layer]
        if e is None:
            return
        keep = (e.pos < sinks) | (e.pos > next_pos - window)
        if not bool(keep.all()):
            self.layers[layer] = LayerKV(e.k[keep], e.v[keep], e.pos[keep])

    def nbytes(self) -> int:
        return sum(0 if e is None else e.k.nbytes + e.v.nbytes for e in self.layers)

    def note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
