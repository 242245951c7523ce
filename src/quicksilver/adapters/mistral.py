"""Mistral: Llama's layout with ``config.sliding_window`` on every layer.

With a window (Mistral-7B-v0.1: 4,096 keys) each query sees the keys at most ``window - 1``
positions back (``q - k < window``, transformers' sliding mask) in a prefill, in every decode
step (the generation cache drops what falls out of the window) and under every KV rule (a rule
chooses among the keys the window leaves). Without one (v0.2 and later) a Mistral layer is a
Llama layer, compiled decode step included.
"""

from __future__ import annotations

from .llama import LlamaAdapter, arch_spec as llama_arch, uniform_window


def arch_spec(config):
    return llama_arch(config, "mistral", uniform_window)


class MistralAdapter(LlamaAdapter):
    family = "mistral"
    windows = staticmethod(uniform_window)
