"""Adaptive Matryoshka Quantization: each token's bit-width from a cheap importance score.

The paper (QuickSilver, arXiv 2506.22396, Sec. 3.4) assigns 8, 4 or 2 bits per token from
nested weights. Here every decoder linear is quantized once to int8 (``quicksilver.quant``;
int4 and int2 are MatQuant slices of the same codes). Every token runs int8 up to
``decision_layer``; there its bit-width for the remaining layers is read off its relative
drift at that layer (how much the layer still changed it: a token that barely changes is
taken as less important), a probe costing a few FLOPs per token, not the eight-layer
vocabulary head the paper's entropy would need on the default model. The rule reads the
token's own state only, so it is causal. ``uniform_bits`` gives the uniform baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_choice, check_range

BITS = (8, 4, 2)
SCHEMES = ("matquant", "q4_1")


@dataclass
class AdaptiveMatryoshkaQuantization:
    """Settings of Adaptive Matryoshka Quantization.

    Parameters
    ----------
    enabled : bool, default False
    group_size : int or None, default None
        None: one scale per output channel (int8 rows then run the real int8 kernel);
        an int: one scale per group of input channels (better low slices, no fast kernel).
    decision_layer : int, default 8
        Tokens choose their bit-width after this many layers; before, every token runs int8.
    int4_below : float, default 0.0
        A token whose relative drift at the decision layer is below this runs int4 after it.
    int2_below : float, default 0.0
        Below this it runs int2 (must not exceed ``int4_below``).
    uniform_bits : {None, 8, 4, 2}, default None
        Every token at this precision in every layer (the uniform baselines).
    protect_first : int, default 4
        The first positions (attention sinks) keep 8 bits.
    smoothing : float or None, default None
        SmoothQuant's alpha: activation outliers migrate into the weights before they are
        quantized, with factors from activation ranges on calibration text (the engine
        needs ``calibration_ids``). Helps ``activation_quant``, which quantizes activations.
    activation_quant : bool, default False
        False: weight-only, activations stay in the model's dtype and every precision runs the
        fastest weight-only kernel measured on this machine (``quicksilver.kernels``). True:
        int8 rows also quantize activations per row (W8A8 through fbgemm; per-channel scales).
    head_bits : {None, 8, 4}, default None
        Quantize the LM head too (weight-only, every token at this precision). At decode the
        head is about a fifth of the default model's weight bytes.
    scheme : {"matquant", "q4_1"}, default "matquant"
        How weights are coded. ``matquant``: one int8 copy whose high bits are the lower
        precisions (what per-token bit-widths need). ``q4_1``: GGUF's Q4_1 grid, group-wise
        asymmetric 4-bit (a float16 scale and minimum per ``group_size`` weights; ``quant_q4``),
        for ``uniform_bits=4`` only: far closer than the int8 slice (a model de-quantized from a
        Q4_1 GGUF sits on it exactly), 0.625 bytes per weight at group 32. The LM head keeps int8
        per output channel (``head_bits``).
    """

    enabled: bool = False
    group_size: int | None = None
    decision_layer: int = 8
    int4_below: float = 0.0
    int2_below: float = 0.0
    uniform_bits: int | None = None
    protect_first: int = 4
    smoothing: float | None = None
    activation_quant: bool = False
    head_bits: int | None = None
    scheme: str = "matquant"

    def __post_init__(self):
        check_range("amq", "group_size", self.group_size, 1, integer=True, allow_none=True)
        check_range("amq", "decision_layer", self.decision_layer, 1, integer=True)
        check_range("amq", "int4_below", self.int4_below, 0.0, 2.0)
        check_range("amq", "int2_below", self.int2_below, 0.0, 2.0)
        check_range("amq", "protect_first", self.protect_first, 0, integer=True)
        check_range("amq", "smoothing", self.smoothing, 0.0, 1.0, allow_none=True)
        if self.uniform_bits is not None:
            check_choice("amq", "uniform_bits", self.uniform_bits, BITS)
        if self.head_bits is not None:
            check_choice("amq", "head_bits", self.head_bits, (8, 4))
        check_choice("amq", "scheme", self.scheme, SCHEMES)
        if self.scheme == "q4_1" and (self.uniform_bits != 4 or self.group_size is None or self.group_size % 32
                                      or self.smoothing is not None or self.activation_quant):
            from ..errors import QuicksilverError

            raise QuicksilverError("amq.scheme=q4_1 is uniform 4-bit weights: it needs amq.uniform_bits=4 and amq.group_size a "
                                   "multiple of 32, without smoothing or activation_quant")
        if self.int2_below > self.int4_below:
            from ..errors import QuicksilverError

            raise QuicksilverError(f"amq.int2_below ({self.int2_below}) must not exceed amq.int4_below ({self.int4_below})")

    def check_model(self, n_layers: int, d_model: int, d_ff: int) -> None:
        from ..errors import QuicksilverError

        if not self.enabled:
            return
        if self.adaptive and self.decision_layer >= n_layers:
            raise QuicksilverError(f"amq.decision_layer={self.decision_layer} is past the model's last layer ({n_layers - 1})")
        if self.group_size is not None and (d_model % self.group_size or d_ff % self.group_size):
            raise QuicksilverError(f"amq.group_size={self.group_size} must divide the model's widths {d_model} and {d_ff}")

    @property
    def adaptive(self) -> bool:
        return self.enabled and self.uniform_bits is None and self.int4_below > 0

    def initial_bits(self) -> int:
        return self.uniform_bits or 8

    def bits_for(self, drift: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pure rule: bit-width per token from its drift at the decision layer; (N,), (N,) -> (N,) int."""
        bits = torch.full_like(drift, 8, dtype=torch.long)
        bits[drift < self.int4_below] = 4
        bits[drift < self.int2_below] = 2
        bits[positions < self.protect_first] = 8
        return bits

    def probe_flops(self, rows: int, d_model: int) -> int:
        """The relative drift: a difference and two squared norms per row."""
        return rows * 2 * 2 * d_model
