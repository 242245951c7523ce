"""What the engine needs from a model family: its shape (ArchSpec) and its primitives.

An adapter reads the weights of the Hugging Face modules in place (views, never
copies) and exposes them as plain tensors, so the engine runs any supported family
with one family-independent loop. Only modules in this package import transformers'
modeling code or read its module attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..linears import Linear
from ..spec import ArchSpec

__all__ = ["ArchSpec", "FamilyAdapter", "LayerParams", "Linear", "fused_linear", "to_device"]


def _adjacent(parts: list[torch.Tensor]) -> bool:
    """The tensors lie one after another in one storage, row-major: their concatenation is a view."""
    first = parts[0]
    at = first.storage_offset()
    for t in parts:
        if t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.storage_offset() != at:
            return False
        at += t.numel()
    return True


def _rows_view(parts: list[torch.Tensor]) -> torch.Tensor:
    """The concatenation along dim 0 of adjacent, contiguous tensors, as a view of their storage."""
    first = parts[0].detach()
    shape = (sum(t.shape[0] for t in parts), *first.shape[1:])
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape, first.stride())


def _fusable(parts: list[torch.Tensor]) -> bool:
    first = parts[0]
    return all(
        type(t.data) is torch.Tensor and t.is_contiguous() and t.dtype == first.dtype and t.device == first.device
        and t.device.type != "meta" and t.is_floating_point() and t.shape[1:] == first.shape[1:]
        for t in parts)


def _into_one_buffer(parts: list[torch.Tensor]) -> torch.Tensor:
    """Move tensors (parameters of the HF modules) into one buffer and re-point each at its rows.

    Values do not change and no memory is added (the old storages are freed); the HF model
    keeps working on the same numbers. Returns the buffer.
    """
    with torch.no_grad():
        buf = torch.cat([t.detach() for t in parts])
        at = 0
        for t in parts:
            t.data = buf[at : at + t.shape[0]]
            at += t.shape[0]
    return buf


def fused_linear(linears: list[Linear]) -> Linear | None:
    """One linear whose output is the concatenation of the given linears' outputs (same input).

    The weights are laid out adjacently in memory, as views of one buffer (the HF modules'
    parameters are re-pointed at their rows the first time), so the fused weight is a view and
    costs no memory. One matmul over the concatenated rows reads the same bytes as the separate
    ones, with fewer calls and better use of the memory bandwidth (measured in bfloat16 on a
    2-core CPU: 29.9 to 23.2 ms for one decode step's matmuls). Returns None when the weights
    cannot share a buffer (different dtypes or devices, tensor subclasses, offloaded weights),
    or when some linears have a bias and others do not.
    """
    ws = [m.weight for m in linears]
    bs = [m.bias for m in linears]
    if not _fusable(ws) or (any(b is None for b in bs) and not all(b is None for b in bs)):
        return None
    if bs[0] is not None and not _fusable(bs):
        return None
    weight = _rows_view(ws) if _adjacent(ws) else _into_one_buffer(ws)
    bias = None if bs[0] is None else (_rows_view(bs) if _adjacent(bs) else _into_one_buffer(bs))
    return Linear(weight, bias)


@dataclass
class LayerParams:
    """One decoder layer as the engine sees it.

    ``mlp_linears`` is (gate, up, down) for a gated MLP, (fc, proj) otherwise. The optional
    fields are identity/None by default; Gemma-3 fills them: ``q_norm``/``k_norm`` act on
    (N, heads, head_dim) before RoPE (QK-norm), ``attn_out_norm``/``mlp_out_norm`` on the
    attention and MLP outputs before the residual add (sandwich norms), ``window`` is the
    family's own sliding window at this layer, ``rope_key`` picks this layer's RoPE tables
    when the adapter's ``rotary`` returns one pair per layer type. ``qkv`` and ``gate_up``, when
    set, compute the concatenated outputs of q/k/v and of gate/up in one matmul each
    (``fused_linear``).
    """

    attn_norm: Callable[[torch.Tensor], torch.Tensor]
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    mlp_norm: Callable[[torch.Tensor], torch.Tensor]
    mlp_linears: tuple[Linear, ...]
    act: Callable[[torch.Tensor], torch.Tensor]
    attn_scale: float
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    attn_out_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    mlp_out_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    window: int | None = None
    rope_key: str | None = None
    qkv: Linear | None = None  # q, k and v in one matmul (fused_linear), where the weights allow it
    gate_up: Linear | None = None  # gate and up in one matmul, where the weights allow it
    # Llama-style layers only: the weights of (attn_norm, mlp_norm) and their epsilon, when both
    # norms are RMSNorm as transformers' Llama computes it (what the compiled decode step uses).
    rms_weights: tuple[torch.Tensor, torch.Tensor] | None = None
    rms_eps: float | None = None

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head norms of queries and keys, (N, heads, head_dim) each (identity without QK-norm)."""
        return (q if self.q_norm is None else self.q_norm(q)), (k if self.k_norm is None else self.k_norm(k))

    def post_attn(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.attn_out_norm is None else self.attn_out_norm(x)

    def post_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mlp_out_norm is None else self.mlp_out_norm(x)

    def rope_tables(self, rope):
        """This layer's (cos, sin) from what the adapter's ``rotary`` returned."""
        return rope[self.rope_key] if self.rope_key is not None else rope

    def attention_rule(self, kv, layer: int):
        """(window, sinks, visible) at this layer: KV skipping's rule within the family's own window.

        ``visible(q_pos, k_pos) -> bool (Tq, Tk)``. A query sees a key when KV skipping keeps it
        and, on a sliding-window layer, when it lies within the last ``self.window`` positions
        (Gemma-3: ``q - k < window``, as transformers' sliding mask). ``window`` bounds every
        visible key apart from the ``sinks`` (what the blocked attention path and the cache's
        eviction need); the sinks only count while KV skipping's window is the tighter one.
        """
        kv_window = kv.window_at(layer)
        if self.window is None:
            return kv_window, kv.sink_tokens, lambda qp, kp: kv.visible(qp, kp, layer)
        own = self.window

        def visible(qp, kp):
            return kv.visible(qp, kp, layer) & (qp[:, None] - kp[None, :] < own)

        if kv_window is not None and kv_window < own:
            return kv_window, kv.sink_tokens, visible
        return own, 0, visible

    @property
    def device(self) -> torch.device:
        """Where this layer's weights live (accelerate's ``device_map`` may spread layers over GPUs)."""
        return self.q.weight.device

    def linears(self) -> dict[str, Linear]:
        """Every decoder linear of the layer by name (what weight quantization replaces)."""
        names = ("gate", "up", "down") if len(self.mlp_linears) == 3 else ("fc", "proj")
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o, **dict(zip(names, self.mlp_linears))}

    def mlp(self, x: torch.Tensor, lin: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
            gate_up: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The MLP; ``lin(name, x)`` replaces the plain linears (e.g. quantized ones), and
        ``gate_up(x)`` computes the gate and up projections in one call, concatenated."""
        if lin is None:
            linears = self.linears()
            lin = lambda name, t: linears[name](t)  # noqa: E731
        if len(self.mlp_linears) == 3:
            if gate_up is not None:
                gate, up = gate_up(x).chunk(2, dim=-1)
                return lin("down", self.act(gate) * up)
            return lin("down", self.act(lin("gate", x)) * lin("up", x))
        return lin("proj", self.act(lin("fc", x)))


class FamilyAdapter:
    """Primitives of one model family; subclasses fill them from a loaded HF model.

    Shapes: token rows are flattened to (N, d) with an explicit ``positions`` (N,).
    """

    arch: ArchSpec
    layers: list[LayerParams]
    final_rms_weight: torch.Tensor | None = None  # the final norm as RMSNorm with the layers' rms_eps, where it is

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def output_device(self) -> torch.device:
        """Where the final norm and the LM head run (the last device of a ``device_map``)."""
        return self.model.get_output_embeddings().weight.device

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin), each (N, head_dim), or None for a family without RoPE."""
        return None

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` through the LM head's linear (``head_linear``), kept for the adapter's lifetime."""
        lin = self.__dict__.get("_head_lin")
        if lin is None or lin.weight is not self._head.weight:
            lin = self.__dict__["_head_lin"] = self.head_linear()
        return lin(h)

    def head_linear(self) -> Linear:
        """The LM head as a plain linear (what head quantization replaces)."""
        head = self._head
        return Linear(head.weight, getattr(head, "bias", None))


def to_device(device: torch.device, *values):
    """``values`` on ``device``: tensors moved (no copy when already there), tuples/dicts of tensors too, None kept.

    The engine's rows follow the layers of a model spread over devices with this.
    """
    def move(v):
        if v is None:
            return None
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v.to(device)

    return tuple(move(v) for v in values)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (N, heads, head_dim) with (N, head_dim) tables, the half-split layout HF uses."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sin table with rotate_half's sign folded in: rotate_half(x) * sin == x.roll(d/2) * signed_sin(sin)."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def apply_rotary_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` with a ``signed_sin`` table: one roll instead of chunk, negate and concatenate
    (bit-identical: negation is exact)."""
    return x * cos[:, None, :] + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed[:, None, :]
