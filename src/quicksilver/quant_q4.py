"""Group-wise asymmetric 4-bit weights: GGUF's Q4_1 grid (and AWQ's), pure functions.

Each group of ``group_size`` consecutive input channels of an output row (32 by default) has a
float16 scale d and a float16 minimum m; a weight is stored as a code q in 0..15 and means

    w = d * q + m        (float32 arithmetic: the product, then the sum, each rounded)

which is how GGUF's Q4_1 dequantizes (ggml's ``dequantize_row_q4_1``, gguf-py's ``dequantize``).
Quantizing follows Q4_1's rule: m is the group's minimum, d spans it to the maximum in 15
steps (both rounded to float16), and q is the nearest step (ties to even), clamped to 0..15;
a weight already on such a grid (a model de-quantized from a Q4_1 GGUF) comes back exactly.

Storage: codes (out, in / 2) uint8, two per byte, laid out as Q4_1 blocks: in every 32 input
channels, byte j holds channel j in its low nibble and channel j + 16 in its high nibble (one
load and a mask, or a shift, give 16 consecutive weights); scales and minima (out, in /
group_size) float16. At group 32 that is 20 bytes per 32 weights, 0.625 bytes per weight (Q4_1's
size); at group 64, 0.5625. ``quicksilver.native.step`` computes with this layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # Q4_1's block
LEVELS = 15  # the largest code


@dataclass(frozen=True)
class Q4Weight:
    """A (out, in) weight as 4-bit codes (out, in // 2) uint8, with float16 ``scales`` and ``mins``
    (out, in // group_size)."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    group_size: int = GROUP

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], 2 * self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads for one pass over the weight (codes, scales and minima)."""
        return self.codes.nbytes + self.scales.nbytes + self.mins.nbytes

    @property
    def bytes_per_weight(self) -> float:
        out_f, in_f = self.shape
        return self.nbytes / (out_f * in_f)


def _check(in_features: int, group_size: int) -> None:
    if group_size < 32 or group_size % 32:
        raise ValueError(f"group_size must be a multiple of 32, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {in_features} input channels")


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) with values 0..15 -> (out, in // 2) uint8 in Q4_1's block layout."""
    out_f, in_f = q.shape
    _check(in_f, GROUP)
    b = q.to(torch.uint8).reshape(out_f, in_f // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(out_f, in_f // 2).contiguous()


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``pack_nibbles`` undone: (out, in // 2) uint8 -> (out, in) uint8 codes 0..15."""
    out_f, half = codes.shape
    b = codes.reshape(out_f, half // 16, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(out_f, 2 * half)


def quantize_q4(weight: torch.Tensor, group_size: int = GROUP) -> Q4Weight:
    """Q4_1 codes of a (out, in) weight: per group, m = min, d = (max - m) / 15 (float16 each),
    q = round((w - m) / d) clamped to 0..15 (q = 0 where d is 0)."""
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    _check(in_f, group_size)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight has non-finite values")
    g = w.reshape(out_f, in_f // group_size, group_size)
    mins = g.amin(dim=-1).to(torch.float16)  # (out, groups)
    m = mins.float()
    scales = ((g.amax(dim=-1) - m) / LEVELS).to(torch.float16)
    if not bool(torch.isfinite(mins).all() and torch.isfinite(scales).all()):
        raise ValueError("the weight's range does not fit float16 scales")
    d = scales.float()[..., None]
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((g - m[..., None]) / safe).clamp_(0, LEVELS)
    q = torch.where(d > 0, q, torch.zeros_like(q))
    return Q4Weight(pack_nibbles(q.reshape(out_f, in_f).to(torch.uint8)), scales, mins, group_size)


def dequantize_q4(qw: Q4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (out, in): d * q + m in float32, then cast to ``dtype``."""
    out_f, in_f = qw.shape
    q = unpack_nibbles(qw.codes).float().reshape(out_f, in_f // qw.group_size, qw.group_size)
    w = q * qw.scales.float()[..., None] + qw.mins.float()[..., None]
    return w.reshape(out_f, in_f).to(dtype)
