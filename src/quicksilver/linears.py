"""Linears as the engine calls them: plain, fused, and quantized, resolved once per engine.

``Linear`` is one stock linear (a view of the HF module's weight). ``QuantizedLinear`` is one
decoder linear at 8, 4 and 2 bits from one int8 copy (``quant``'s pure codes), run through the
fastest kernel measured on this machine (``kernels``); ``Int8Kernel`` is the W8A8 path.
``LayerLinears`` is what one engine resolves per layer at construction (as gpt-fast swaps each
linear once): every call site in the layer loop gets a callable ``f(x, bits)`` and never asks
again whether the weights are quantized or fused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .hardware import cpu_int8_dot
from .kernels import NestedWeight, dense, matmul
from .quant import QuantizedWeight, quantize_int8, smoothing_factors, weight_bytes
from .quant_q4 import Q4Weight, dequantize_q4, quantize_q4

@dataclass
class Linear:
    """A linear map y = x @ weight.T + bias; ``weight`` is (out, in), often a view.

    Calls run through ``quicksilver.kernels.dense``: torch's matmul, or a native kernel over the
    same weights where one measured faster for the call's row count on this machine (bfloat16).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        return dense(self.weight, self.bias, x, self._memo)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


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


class _LazyQuantized(dict):
    """One layer's quantized linears by name, each quantized on first use (a layer whose q/k/v
    and gate/up always run fused never builds them separately)."""

    def __init__(self, lins: dict, smooth: dict, amq):
        super().__init__()
        self._lins, self._smooth, self._amq = lins, smooth, amq

    def __missing__(self, name: str):
        m, amq = self._lins[name], self._amq
        self[name] = QuantizedLinear(m.weight, m.bias, amq.group_size, self._smooth[name], amq.activation_quant)
        return self[name]


def _fused_linears(lins: dict, amq) -> dict:
    """Quantized linears over concatenated weights of linears that read the same input.

    Scales are per output channel (or per output channel and input group), so quantizing
    the concatenation gives exactly the codes of each part: the same function, fewer calls.
    """
    def cat(names):
        ws = [lins[n].weight for n in names]
        bs = [lins[n].bias for n in names]
        bias = None if all(b is None for b in bs) else torch.cat(
            [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(ws, bs)])
        return QuantizedLinear(torch.cat(ws), bias, amq.group_size, None, amq.activation_quant)

    fused = {"qkv": cat(("q", "k", "v"))}
    if "gate" in lins:
        fused["gate_up"] = cat(("gate", "up"))
    return fused


LINEAR_GROUPS = {"q": ("q",), "k": ("k", "v"), "o": ("o",), "mlp": ("gate", "up", "down", "fc", "proj")}


class Q4Linear:
    """One linear on GGUF's Q4_1 grid (``quant_q4``): the codes a native 4-bit kernel reads, and for
    every other call the float weight they mean, decoded once into the model's dtype (memory traded
    for time, as the dequantized int8 kernels do)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int):
        self.q4: Q4Weight = quantize_q4(weight, group_size)
        self.bias = bias
        self.weight = dequantize_q4(self.q4, weight.dtype)

    def __call__(self, x: torch.Tensor, bits=None) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


LinearFn = Callable[[torch.Tensor, "int | torch.Tensor | None"], torch.Tensor]


def _plain(m: Linear) -> LinearFn:
    return lambda x, bits: m(x)


class LayerLinears:
    """One layer's linears, resolved once per engine; every call is ``f(x, bits)``.

    ``lin[name]`` runs one linear (``q``, ``k``, ``v``, ``o`` and the MLP's); ``qkv`` and ``gate_up``
    run linears that read the same input as one matmul over concatenated weights (None where the
    layer cannot). ``bits`` is one int for every row, (n,) per row, or None for stock weights.

    Build with ``LayerLinears(plain, qkv, gate_up)`` (stock weights), ``LayerLinears.quantized``
    (AMQ: one int8 copy per linear, quantized on first use) or ``LayerLinears.recording``
    (stock weights that record the largest |input| per channel, for SmoothQuant's factors).
    """

    def __init__(self, plain: dict[str, Linear], qkv: Linear | None = None, gate_up: Linear | None = None):
        self.plain = plain
        self.quant: dict | None = None  # quantized: name -> QuantizedLinear (built on first use)
        self.fused: dict = {}  # quantized: "qkv"/"gate_up" -> QuantizedLinear over the concatenated weights
        self.lin: dict[str, LinearFn] = {n: _plain(m) for n, m in plain.items()}
        self.qkv: LinearFn | None = None if qkv is None else _plain(qkv)
        self.gate_up: LinearFn | None = None if gate_up is None else _plain(gate_up)

    @classmethod
    def quantized(cls, plain: dict[str, Linear], amq, smooth: dict | None = None) -> "LayerLinears":
        """Quantized linears; with SmoothQuant factors (``smooth``: name -> (in,)) each linear has its
        own, so nothing fuses; without, q/k/v and gate/up quantize as one concatenated weight each
        (the same codes: scales are per output channel or group)."""
        self = cls(plain)
        if amq.scheme == "q4_1":  # one grid per linear; q/k/v and gate/up on the grid of their concatenation
            self.quant = {n: Q4Linear(m.weight, m.bias, amq.group_size) for n, m in plain.items()}
            self.lin = {n: q for n, q in self.quant.items()}
            self.fused = {g: Q4Linear(torch.cat([plain[n].weight for n in names]), _cat_bias(plain, names), amq.group_size)
                          for g, names in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))) if all(n in plain for n in names)}
            self.qkv, self.gate_up = self.fused.get("qkv"), self.fused.get("gate_up")
            return self
        self.quant = quant = _LazyQuantized(plain, smooth or {n: None for n in plain}, amq)
        self.lin = {n: (lambda x, bits, n=n: quant[n](x, bits)) for n in plain}
        self.fused = _fused_linears(plain, amq) if smooth is None else {}
        self.qkv, self.gate_up = self.fused.get("qkv"), self.fused.get("gate_up")
        return self

    @classmethod
    def recording(cls, plain: dict[str, Linear], seen: dict) -> "LayerLinears":
        """Stock linears, each call also keeping ``seen[name]``: the running max |x| per input channel."""
        self = cls(plain)

        def rec(name, m):
            def run(x, bits):
                now = x.detach().abs().amax(dim=0)
                seen[name] = now if name not in seen else torch.maximum(seen[name], now)
                return m(x)
            return run

        self.lin = {n: rec(n, m) for n, m in plain.items()}
        return self

    def __call__(self, name: str, x: torch.Tensor, bits=None) -> torch.Tensor:
        return self.lin[name](x, bits)

    def step_fn(self, j: int, bits) -> Callable[[torch.Tensor], torch.Tensor]:
        """The callable ``x -> y`` of a decode step's linear j (0 qkv, 1 o, 2 gate_up, 3 down) at ``bits``."""
        if j in (0, 2):
            fused, names = (self.qkv, ("q", "k", "v")) if j == 0 else (self.gate_up, ("gate", "up"))
            if fused is not None:
                return lambda x: fused(x, bits)
            return lambda x: torch.cat([self.lin[n](x, bits) for n in names], dim=-1)
        f = self.lin["o" if j == 1 else "down"]
        return lambda x: f(x, bits)


def _cat_bias(plain: dict, names) -> torch.Tensor | None:
    bs = [plain[n].bias for n in names]
    if all(b is None for b in bs):
        return None
    return torch.cat([b if b is not None else plain[n].weight.new_zeros(plain[n].weight.shape[0]) for n, b in zip(names, bs)])


class WeightBytes:
    """Bytes of decoder weights one call reads, per linear and per ledger group, at each precision
    (``minimum``: 4-bit groups carry a float16 minimum too, the Q4_1 grid)."""

    def __init__(self, plain: dict[str, Linear], group_size: int | None, minimum: bool = False):
        self.shapes = {n: m.weight.shape for n, m in plain.items()}
        self.elem = plain["q"].weight.element_size()
        self.group_size = group_size
        self.minimum = minimum
        self.groups = {(g, b): sum(self.of(m, b) for m in LINEAR_GROUPS[g] if m in self.shapes)
                       for g in LINEAR_GROUPS for b in (16, 8, 4, 2)}

    def of(self, name: str, bits: int) -> int:
        shape = self.shapes[name]
        if bits == 16:  # unquantized: the weights in the model's own dtype
            return shape[0] * shape[1] * self.elem
        return weight_bytes(shape, bits, self.group_size, self.minimum and bits == 4)


def smoothing(plain: list[dict[str, Linear]], absmax: list[dict], alpha: float) -> list[dict]:
    """SmoothQuant factors per layer and linear, from the calibration text's activation maxima."""
    return [{n: smoothing_factors(absmax[l][n], m.weight, alpha) for n, m in lins.items()} for l, lins in enumerate(plain)]
