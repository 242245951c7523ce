"""Phi-3 (Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini): Llama's computation over fused weights.

- ``qkv_proj`` holds q, k and v as consecutive rows and ``gate_up_proj`` gate then up: the
  engine's q/k/v and gate/up linears are row views of them, and its fused groups (``qkv``,
  ``gate_up``) are the weights themselves, so nothing is copied or re-pointed.
- RoPE from the model's own rotary module: ``longrope`` (the 128k checkpoints) takes the short
  or long factors by the pass's last position and scales cos/sin by its attention factor, as
  transformers does.
- ``partial_rotary_factor`` < 1 (Phi-4-mini: 0.75) rotates the first ``rotary_dim`` dims of a
  head in pairs (i, i + rotary_dim/2) and passes the rest through; the engine rotates pairs
  (j, j + head_dim/2). One fixed permutation of the head dims, the same for queries and keys
  (applied where the engine applies QK-norm), maps one layout onto the other, with cos 1 and
  sin 0 on the passed-through dims. Scores q.k are unchanged by a common permutation and values
  are not permuted, so attention is the stock one (the K/V cache holds permuted keys).
- ``sliding_window`` on every layer where it can bind (Phi-3-mini-4k: 2,047 keys).
"""

from __future__ import annotations

import torch

from ..errors import QuicksilverError
from .base import Linear
from .llama import LlamaAdapter, arch_spec as llama_arch, uniform_window


def arch_spec(config):
    return llama_arch(config, "phi3", uniform_window)


def _rows(module, start: int, stop: int) -> Linear:
    """Rows [start, stop) of a linear, as views of its weight (and bias)."""
    bias = None if module.bias is None else module.bias[start:stop]
    return Linear(module.weight[start:stop], bias)


class _HeadPermutation:
    """Queries or keys (N, heads, head_dim) with their head dims reordered by ``perm``."""

    def __init__(self, perm: torch.Tensor):
        self.perm = perm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.perm)


def partial_rotary_permutation(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """``perm`` with ``x[..., perm]`` putting HF's rotary pair (i, i + rotary_dim/2) at
    (i, i + head_dim/2) and the passed-through dims at the remaining pairs."""
    half, rhalf, rest = head_dim // 2, rotary_dim // 2, (head_dim - rotary_dim) // 2
    first = list(range(rhalf)) + list(range(rotary_dim, rotary_dim + rest))
    second = list(range(rhalf, rotary_dim)) + list(range(rotary_dim + rest, head_dim))
    assert len(first) == len(second) == half
    return torch.tensor(first + second)


class Phi3Adapter(LlamaAdapter):
    family = "phi3"
    windows = staticmethod(uniform_window)

    def __init__(self, model):
        config = model.config
        spec = arch_spec(config)
        factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        self._rotary_dim = int(spec.head_dim * factor)
        if self._rotary_dim % 2 or not 0 < self._rotary_dim <= spec.head_dim:
            raise QuicksilverError(f"phi3 rotary dimension {self._rotary_dim} of head dim {spec.head_dim} is not supported (even, at most head_dim)")
        self._perm = None
        if self._rotary_dim < spec.head_dim:
            perm = partial_rotary_permutation(spec.head_dim, self._rotary_dim)
            self._perm = perm.to(model.model.layers[0].self_attn.qkv_proj.weight.device)
        super().__init__(model)

    def attention(self, attn) -> dict:
        spec, proj = self.arch, attn.qkv_proj
        qd, kd = spec.q_dim, spec.kv_dim
        parts = {"q": _rows(proj, 0, qd), "k": _rows(proj, qd, qd + kd), "v": _rows(proj, qd + kd, qd + 2 * kd),
                 "o": Linear(attn.o_proj.weight, attn.o_proj.bias), "qkv": Linear(proj.weight, proj.bias)}
        if self._perm is not None:
            permute = _HeadPermutation(self._perm.to(proj.weight.device))
            parts.update(q_norm=permute, k_norm=permute)
        return parts

    def feed_forward(self, mlp) -> dict:
        proj, d_ff = mlp.gate_up_proj, self.arch.d_ff
        gate, up = _rows(proj, 0, d_ff), _rows(proj, d_ff, 2 * d_ff)
        down = Linear(mlp.down_proj.weight, mlp.down_proj.bias)
        # Phi3MLP computes up * act(gate): the same products as the engine's act(gate) * up.
        return {"mlp_linears": (gate, up, down), "act": mlp.activation_fn, "gate_up": Linear(proj.weight, proj.bias)}

    def rotary(self, positions):
        cos, sin = super().rotary(positions)  # (N, rotary_dim) each
        if self._perm is None:
            return cos, sin
        half, rhalf = self.arch.head_dim // 2, self._rotary_dim // 2
        full_cos = cos.new_ones(cos.shape[0], self.arch.head_dim)
        full_sin = sin.new_zeros(sin.shape[0], self.arch.head_dim)
        for full, part in ((full_cos, cos), (full_sin, sin)):
            full[:, :rhalf] = part[:, :rhalf]
            full[:, half : half + rhalf] = part[:, rhalf:]
        return full_cos, full_sin
