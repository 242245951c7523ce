"""Qwen3 (dense): Llama's layout with a per-head RMSNorm on queries and keys before RoPE
(QK-norm, as Gemma-3's) and, by default, no q/k/v bias.

The QK-norms are transformers' own modules, applied on (N, heads, head_dim) as Qwen3Attention
applies them; a layer with them runs the engine's eager loop (the compiled decode step has no
QK-norm). Sliding layers follow ``config.layer_types`` as in Qwen2.
"""

from __future__ import annotations

from .llama import LlamaAdapter, arch_spec as llama_arch, layer_type_windows


def arch_spec(config):
    return llama_arch(config, "qwen3", layer_type_windows)


class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    windows = staticmethod(layer_type_windows)

    def attention(self, attn) -> dict:
        return {**super().attention(attn), "q_norm": attn.q_norm, "k_norm": attn.k_norm}
