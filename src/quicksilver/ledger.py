"""The ledger: what one forward pass (or a whole run) executed, counted as it ran.

Its own module so that the engine, generation and evaluation all import it one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import flops as F
from .spec import ArchSpec


@dataclass
class Ledger:
    """What one forward pass executed, counted as it ran."""

    n_layers: int
    tokens: int = 0
    flops: dict = field(default_factory=lambda: {k: 0 for k in ("projections", "mlp", "attention", "head", "probes")})
    attn_rows: int = 0  # token-layers that computed attention (as queries)
    mlp_rows: int = 0  # token-layers that computed the MLP
    kv_written: int = 0  # K/V entries written, summed over layers
    pairs_seen: int = 0  # (query, key) pairs attended, summed over layers
    pairs_full: int = 0  # the same with every causal pair
    exit_layer_sum: int = 0
    halted_tokens: int = 0
    bit_linear_flops: float = 0.0  # linear FLOPs x bits/16 (unquantized linears count at 16)
    weight_bytes: int = 0  # bytes of decoder weights read by the linears that ran
    bits_hist: dict = field(default_factory=lambda: {8: 0, 4: 0, 2: 0, 16: 0})  # token-layers per precision
    fused_tokens: int = 0  # tokens that joined an earlier token's path

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    def as_dict(self) -> dict:
        slots = max(self.tokens * self.n_layers, 1)
        return {
            "tokens": self.tokens,
            "flops": {**self.flops, "total": self.total_flops},
            "mean_exit_layer": self.exit_layer_sum / max(self.tokens, 1),
            "halted_fraction": self.halted_tokens / max(self.tokens, 1),
            "attn_layer_fraction": self.attn_rows / slots,
            "mlp_layer_fraction": self.mlp_rows / slots,
            "kv_written_fraction": self.kv_written / slots,
            "kv_fraction": self.pairs_seen / max(self.pairs_full, 1),
            "bit_weighted_flops": self.total_flops - self.flops["projections"] - self.flops["mlp"] + self.bit_linear_flops,
            "weight_bytes": self.weight_bytes,
            "bits_per_token": _mean_bits(self.bits_hist),
            "bits_histogram": {str(k): v for k, v in self.bits_hist.items() if v},
            "fused_fraction": self.fused_tokens / max(self.tokens, 1),
        }

    def count_layer(self, spec: ArchSpec, n_q: int, n_kv: int, n_mlp: int, pairs: int, full_pairs: int) -> None:
        """One layer over the rows that ran it: ``n_q`` queries (q and o projections), ``n_kv`` K/V
        entries written, ``n_mlp`` MLP rows, ``pairs`` (query, key) pairs attended of ``full_pairs``."""
        self.flops["projections"] += F.q_proj_flops(spec, n_q) + F.kv_proj_flops(spec, n_kv) + F.o_proj_flops(spec, n_q)
        self.flops["attention"] += F.attention_flops(spec, pairs)
        self.flops["mlp"] += F.mlp_flops(spec, n_mlp)
        self.attn_rows += n_q
        self.mlp_rows += n_mlp
        self.kv_written += n_kv
        self.pairs_seen += pairs
        self.pairs_full += full_pairs

    def count_bits(self, spec: ArchSpec, rows: dict, group_bytes: dict, bits: int | None = None) -> None:
        """The precision ledger of one layer: linear FLOPs weighted by bits/16, and the weight bytes
        each call read (each precision present reads its group's weights once).

        ``rows``: for each ledger group (``q``, ``k`` (K and V), ``o``, ``mlp``) its row count when
        every row ran at ``bits``, else the bit-widths (n,) of its rows. ``group_bytes[(group, bits)]``:
        bytes a call of the group reads (``linears.WeightBytes.groups``).
        """
        per_row = {"q": F.q_proj_flops(spec, 1), "k": F.kv_proj_flops(spec, 1), "o": F.o_proj_flops(spec, 1),
                   "mlp": F.mlp_flops(spec, 1)}
        if bits is not None:  # one precision: no per-row bookkeeping
            for name in ("q", "k", "o", "mlp"):
                n = rows[name]
                self.bit_linear_flops += per_row[name] * n * bits / 16
                if n:
                    self.weight_bytes += group_bytes[name, bits]
            self.bits_hist[bits] += rows["mlp"]
            return
        for name in ("q", "k", "o", "mlp"):
            b = rows[name]
            if b.numel() == 0:
                continue
            self.bit_linear_flops += per_row[name] * float(b.sum()) / 16
            for present in torch.unique(b).tolist():
                self.weight_bytes += group_bytes[name, present]
        for b_val, count in zip(*torch.unique(rows["mlp"], return_counts=True)):
            self.bits_hist[int(b_val)] += int(count)

    def merge(self, other: "Ledger", times: int = 1) -> None:
        """Add ``other``'s counts (``times`` over: layers that all counted alike)."""
        for k in self.flops:
            self.flops[k] += times * other.flops[k]
        for name in ("tokens", "attn_rows", "mlp_rows", "kv_written", "pairs_seen", "pairs_full", "exit_layer_sum",
                     "halted_tokens", "bit_linear_flops", "weight_bytes", "fused_tokens"):
            setattr(self, name, getattr(self, name) + times * getattr(other, name))
        for k in self.bits_hist:
            self.bits_hist[k] += times * other.bits_hist[k]


def _mean_bits(hist: dict) -> float:
    n = sum(hist.values())
    return sum(k * v for k, v in hist.items()) / n if n else 0.0
