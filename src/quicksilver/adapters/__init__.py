"""One adapter per model family; the registry maps HF ``model_type`` to it."""

from __future__ import annotations

from ..errors import QuicksilverError
from . import gemma3, gpt2, llama, mistral, phi3, qwen2, qwen3
from .base import ArchSpec, FamilyAdapter, LayerParams, Linear

_SPECS = {"gpt2": gpt2.arch_spec, "llama": llama.arch_spec, "gemma3_text": gemma3.arch_spec, "gemma3": gemma3.arch_spec,
          "qwen2": qwen2.arch_spec, "qwen3": qwen3.arch_spec, "mistral": mistral.arch_spec, "phi3": phi3.arch_spec}
_ADAPTERS = {"gpt2": gpt2.GPT2Adapter, "llama": llama.LlamaAdapter, "gemma3_text": gemma3.Gemma3Adapter,
             "qwen2": qwen2.Qwen2Adapter, "qwen3": qwen3.Qwen3Adapter, "mistral": mistral.MistralAdapter,
             "phi3": phi3.Phi3Adapter}

ENGINE_FAMILIES = tuple(_ADAPTERS)
# Every HF ``model_type`` whose shape we read (``gemma3`` is the multimodal wrapper: its text model
# loads, its vision tower is refused by the adapter).
SUPPORTED_FAMILIES = tuple(_SPECS)


def arch_spec(config) -> ArchSpec:
    """Shape of a model from its HF config; a clear error for a family we do not know."""
    kind = getattr(config, "model_type", None)
    if kind not in _SPECS:
        raise QuicksilverError(f"model family {kind!r} is not supported (supported: {', '.join(sorted(_SPECS))})")
    return _SPECS[kind](config)


def adapter_for(model) -> FamilyAdapter:
    """The engine adapter for a loaded HF causal LM (one of ``ENGINE_FAMILIES``)."""
    if not hasattr(model, "config"):
        raise QuicksilverError(f"the engine needs a loaded HF model (model, tokenizer = load_model(name)), got {type(model).__name__}")
    kind = getattr(model.config, "model_type", None)
    if kind not in _ADAPTERS:
        raise QuicksilverError(
            f"the token-level engine supports the {', '.join(ENGINE_FAMILIES)} families, not {kind!r}"
        )
    return _ADAPTERS[kind](model)


__all__ = ["ArchSpec", "FamilyAdapter", "LayerParams", "Linear", "adapter_for", "arch_spec", "ENGINE_FAMILIES",
           "SUPPORTED_FAMILIES"]
