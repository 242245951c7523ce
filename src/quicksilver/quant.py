"""Quantization primitives: one int8 copy of a weight, and its nested int4/int2 slices.

Weights are quantized once, symmetrically, to signed int8 codes q in [-127, 127] with one
scale per output channel (``group_size=None``) or per group of ``group_size`` input
channels. A lower precision r keeps the r most significant bits of the same codes
(MatQuant's slicing, Nair et al. 2025, "Matryoshka Quantization"), taken literally as an
arithmetic shift, with the bucket's midpoint as rounding offset:

    S(q, r) = (q >> (8 - r)) * 2^(8-r) + 2^(7-r)

so int4 is exactly the high nibble of each int8 code: stored as two nibble planes
(``quicksilver.kernels``), an int4 step reads only the high plane, half the bytes of int8.
(An earlier definition rounded q / 2^(8-r) to nearest and clamped; its int4 value equalled
the high nibble for only about 56% of codes, so no kernel could read half the bytes.)
``dequantize`` maps codes back to floats; ``quicksilver.kernels`` computes with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4, 2)


@dataclass(frozen=True)
class QuantizedWeight:
    """Signed int8 codes (out, in) and float scales (out, groups)."""

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int | None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric int8 codes of a (out, in) weight, per output channel or per input group."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    if in_f % g:
        raise ValueError(f"group_size {g} does not divide the {in_f} input channels")
    grouped = w.reshape(out_f, in_f // g, g)
    scales = grouped.abs().amax(dim=-1).clamp_min(1e-12) / 127.0  # (out, groups)
    codes = torch.round(grouped / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(codes.reshape(out_f, in_f), scales, group_size)


def slice_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits``-bit slice S(q, r) of int8 codes, on the int8 grid (int16: the offset can pass 127)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if bits == 8:
        return codes
    shift = 8 - bits
    return ((codes.to(torch.int16) >> shift) << shift) + (1 << (shift - 1))


def dequantize(qw: QuantizedWeight, bits: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weight (out, in) of the ``bits``-bit slice."""
    codes = slice_codes(qw.codes, bits).float()
    out_f, in_f = codes.shape
    g = in_f if qw.group_size is None else qw.group_size
    w = codes.reshape(out_f, in_f // g, g) * qw.scales[..., None]
    return w.reshape(out_f, in_f).to(dtype)


def weight_bytes(shape: torch.Size, bits: int, group_size: int | None, minimum: bool = False) -> int:
    """Bytes a kernel must read for one pass over the weight at ``bits`` (codes plus fp16 scales,
    and an fp16 minimum per group with ``minimum``: the Q4_1 grid)."""
    out_f, in_f = shape
    groups = 1 if group_size is None else in_f // group_size
    return out_f * in_f * bits // 8 + out_f * groups * (4 if minimum else 2)


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors (Xiao et al. 2023, Eq. 4).

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); the linear then computes (x / s) @ (W * s)^T,
    which equals x @ W^T but moves activation outliers into the (per-channel quantized) weight.
    """
    a = act_absmax.float().clamp_min(1e-5)
    w = weight.detach().float().abs().amax(dim=0).clamp_min(1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(1e-5)


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``approx`` against ``reference``, in decibels."""
    noise = (reference.float() - approx.float()).pow(2).mean()
    return float(10 * torch.log10(reference.float().pow(2).mean() / noise.clamp_min(1e-30)))
