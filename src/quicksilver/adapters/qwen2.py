"""Qwen2 and Qwen2.5: Llama's layout with a bias on the q, k and v projections.

The biases travel with their linears (``Linear.bias``) and with the fused qkv matmul, so the
compiled decode step serves Qwen2 as it serves Llama. Small checkpoints tie the LM head to the
embedding (the same tensor, read in place). ``use_sliding_window`` configs slide from layer
``max_window_layers`` on (``config.layer_types``), which the engine honours per layer.
"""

from __future__ import annotations

from .llama import LlamaAdapter, arch_spec as llama_arch, layer_type_windows


def arch_spec(config):
    return llama_arch(config, "qwen2", layer_type_windows)


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    windows = staticmethod(layer_type_windows)
