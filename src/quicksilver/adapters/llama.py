"""Llama family (Llama-2/3, SmolLM2, TinyLlama): RMSNorm, RoPE, grouped-query attention, SwiGLU."""

from __future__ import annotations

import torch

from ..errors import QuicksilverError
from .base import ArchSpec, FamilyAdapter, LayerParams, Linear, fused_linear


def arch_spec(config) -> ArchSpec:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ArchSpec(
        family="llama",
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        d_ff=config.intermediate_size,
        gated_mlp=True,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        attn_windows=(None,) * config.num_hidden_layers,
    )


def _linear(module) -> Linear:
    return Linear(module.weight, module.bias)


def _rms_eps(*norms) -> float | None:
    """The epsilon shared by transformers' ``LlamaRMSNorm`` modules (None for any other norm)."""
    eps = {getattr(n, "variance_epsilon", None) for n in norms}
    plain = all(type(n).__name__ == "LlamaRMSNorm" for n in norms)
    return eps.pop() if plain and len(eps) == 1 and None not in eps else None


class LlamaAdapter(FamilyAdapter):
    def __init__(self, model):
        config = model.config
        if getattr(config, "pretraining_tp", 1) not in (1, None):
            raise QuicksilverError("Llama checkpoints with pretraining_tp > 1 are not supported")
        if config.hidden_act not in ("silu", "swish"):
            raise QuicksilverError(f"Llama activation {config.hidden_act!r} is not supported (silu only)")
        self.model = model
        self.arch = arch_spec(config)
        inner = model.model
        self._rotary = inner.rotary_emb
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = _linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)
            gate, up = _linear(mlp.gate_proj), _linear(mlp.up_proj)
            self.layers.append(
                LayerParams(
                    attn_norm=layer.input_layernorm,
                    q=q,
                    k=k,
                    v=v,
                    o=_linear(attn.o_proj),
                    mlp_norm=layer.post_attention_layernorm,
                    mlp_linears=(gate, up, _linear(mlp.down_proj)),
                    act=mlp.act_fn,
                    attn_scale=attn.scaling,
                    qkv=fused_linear([q, k, v]),
                    gate_up=fused_linear([gate, up]),
                    rms_weights=(layer.input_layernorm.weight, layer.post_attention_layernorm.weight),
                    rms_eps=_rms_eps(layer.input_layernorm, layer.post_attention_layernorm),
                )
            )
        self._embed = inner.embed_tokens
        self._norm = inner.norm
        self._head = model.lm_head
        # The final norm's weight when it is RMSNorm with the layers' epsilon (what a native step runs).
        self.final_rms_weight = inner.norm.weight if _rms_eps(inner.norm) == self.layers[0].rms_eps else None

    def embed(self, input_ids, positions):
        return self._embed(input_ids)

    def rotary(self, positions):
        # HF's rotary module returns (batch, seq, head_dim) tables in the model dtype.
        dummy = self._embed.weight[:1]
        cos, sin = self._rotary(dummy, positions[None, :])
        return cos[0], sin[0]

    def final_norm(self, h):
        return self._norm(h)

    def head(self, h):
        return self.head_logits(h)
