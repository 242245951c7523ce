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


def weight_bytes(shape: torch.Size, bits: int, group_size: int | None) -> int:
    """Bytes a kernel must read for one pass over the weight at ``bits`` (codes plus fp16 scales)."""
    out_f, in_f = shape
    groups = 1 if group_size is None else in_f // group_size
    return out_f * in_f * bits // 8 + out_f * groups * 2


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


class Int8Kernel:
    """A real int8 matmul: x86/fbgemm dynamic quantized linear over per-channel int8 codes.

    fbgemm quantizes activations with one range per tensor, which would make a token's
    output depend on the other rows of the matmul (later tokens included: not causal, and
    a batch would differ from its rows alone). So each row is first scaled to abs-max 1 and
    two guard rows (all +1, all -1) are appended: the tensor's range is then always exactly
    [-1, 1], every row is quantized alone, and its output is scaled back. The product runs in
    integer arithmetic (``torch.ops.quantized.linear_dynamic``); the same codes, not a copy of
    different ones, are packed. On a CPU without VNNI, fbgemm's AVX2 path multiplies
    u8 x s8 pairs into saturating int16 (``vpmaddubsw``), so activations are quantized to 7
    bits there (``reduce_range``, as torch's own dynamic quantization does): 24 dB of SNR
    against the float product became 37 dB on an AVX2-only EPYC.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None):
        if qw.group_size is not None:
            raise ValueError("the int8 kernel needs per-channel scales (group_size=None)")
        scales = qw.scales[:, 0].double()
        qweight = torch._make_per_channel_quantized_tensor(
            qw.codes, scales, torch.zeros_like(scales, dtype=torch.long), 0
        )
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if bias is None else bias.float()
        guard = torch.ones(2, qw.shape[1])
        guard[1] = -1.0
        self.guard = guard
        from .hardware import cpu_int8_dot

        self.reduce_range = not cpu_int8_dot()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        row_max = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)  # (n, 1)
        y = torch.ops.quantized.linear_dynamic(torch.cat([xf / row_max, self.guard]), self.packed,
                                              self.reduce_range)[:-2] * row_max
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class QuantizedLinear:
    """One decoder linear at 8, 4 and 2 bits from one int8 copy; rows run grouped by bit-width.

    By default the linear is weight-only: activations stay in the model's dtype and each
    precision runs the fastest kernel measured on this machine for the call's row count
    (``quicksilver.kernels``). With ``activation_quant`` (per-channel scales, CPU), int8
    rows instead run ``Int8Kernel``, which also quantizes activations (W8A8, fbgemm).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int | None,
                 smooth: torch.Tensor | None = None, activation_quant: bool = False):
        from .kernels import NestedWeight

        # With SmoothQuant factors the one int8 copy holds W * s, and inputs are divided by s.
        self.qw = quantize_int8(weight if smooth is None else weight.float() * smooth[None, :], group_size)
        self.inv_smooth = None if smooth is None else (1.0 / smooth).to(weight.dtype)
        self.bias = bias
        self.dtype = weight.dtype
        self.nested = NestedWeight(self.qw.codes, self.qw.scales, group_size, bias)
        self._w8a8 = None
        if activation_quant and group_size is None and weight.device.type == "cpu":
            import warnings

            with warnings.catch_warnings():  # torch's quantized tensors are deprecated in favour of torchao
                warnings.simplefilter("ignore", UserWarning)
                self._w8a8 = Int8Kernel(self.qw, bias)

    def run(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """Every row of ``x`` (n, in) at one precision."""
        from .kernels import matmul

        if bits == 8 and self._w8a8 is not None:
            return self._w8a8(x)
        return matmul(self.nested, x, bits)

    def __call__(self, x: torch.Tensor, bits: torch.Tensor | int) -> torch.Tensor:
        """``x`` (n, in) with ``bits`` (n,) per row (or one int for all rows) -> (n, out)."""
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        if isinstance(bits, int):
            return self.run(x, bits)
        present = torch.unique(bits).tolist()
        if len(present) == 1:
            return self.run(x, present[0])
        out = torch.empty(x.shape[0], self.qw.shape[0], dtype=x.dtype, device=x.device)
        for b in present:
            rows = (bits == b).nonzero().squeeze(1)
            out[rows] = self.run(x.index_select(0, rows), b)
        return out
