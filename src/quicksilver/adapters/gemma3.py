"""Gemma-3 text models (Gemma-3-270M and up): sliding-window and global layers, QK-norm,
sandwich norms, a scaled embedding, BOS.

What differs from Llama, and where the engine meets it:
- the embedding is multiplied by sqrt(hidden size) (transformers' scaled embedding module);
- RMSNorm scales by (1 + weight), in float32 (the HF norm modules are used as they are);
- queries and keys get a per-head RMSNorm before RoPE (``LayerParams.q_norm``/``k_norm``);
- attention and MLP outputs get their own norm before the residual add (``attn_out_norm``,
  ``mlp_out_norm``); the pre-MLP norm is ``pre_feedforward_layernorm``;
- sliding layers see their last ``sliding_window`` positions (``LayerParams.window``) and
  use the local RoPE base; global layers see everything with the global base (``rope_key``);
- scores are scaled by ``query_pre_attn_scalar ** -0.5``, the MLP is GeGLU (tanh GELU).
The model expects BOS at the start of every sequence (``bos_per_window`` in models.py).
"""

from __future__ import annotations

import torch

from ..errors import QuicksilverError
from .base import ArchSpec, FamilyAdapter, LayerParams, Linear, fused_linear


def _text_config(config):
    return getattr(config, "text_config", None) or config


def arch_spec(config) -> ArchSpec:
    config = _text_config(config)
    n = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n
    windows = tuple(config.sliding_window if t == "sliding_attention" else None for t in layer_types)
    return ArchSpec(
        family="gemma3",
        n_layers=n,
        d_model=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        d_ff=config.intermediate_size,
        gated_mlp=True,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        attn_windows=windows,
    )


def _linear(module) -> Linear:
    return Linear(module.weight, module.bias)


class Gemma3Adapter(FamilyAdapter):
    def __init__(self, model):
        config = _text_config(model.config)
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise QuicksilverError("Gemma checkpoints with attention logit soft-capping (Gemma-2) are not supported")
        if getattr(config, "use_bidirectional_attention", False):
            raise QuicksilverError("Gemma-3 with bidirectional attention is not a causal LM")
        self.model = model
        self.arch = arch_spec(config)
        inner = model.model
        if not hasattr(inner, "layers"):  # Gemma3ForConditionalGeneration: the text model sits deeper
            raise QuicksilverError("only Gemma-3 text models (Gemma3ForCausalLM) run in the engine")
        self._rotary = inner.rotary_emb
        self._layer_types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        self.layers = []
        for layer, kind, window in zip(inner.layers, self._layer_types, self.arch.attn_windows):
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
                    mlp_norm=layer.pre_feedforward_layernorm,
                    mlp_linears=(gate, up, _linear(mlp.down_proj)),
                    act=mlp.act_fn,
                    attn_scale=attn.scaling,
                    qkv=fused_linear([q, k, v]),
                    gate_up=fused_linear([gate, up]),
                    q_norm=attn.q_norm,
                    k_norm=attn.k_norm,
                    attn_out_norm=layer.post_attention_layernorm,
                    mlp_out_norm=layer.post_feedforward_layernorm,
                    window=window,
                    rope_key=kind,
                )
            )
        self._embed = inner.embed_tokens  # scales by sqrt(hidden size) itself
        self._norm = inner.norm
        self._head = model.lm_head
        self._softcap = getattr(config, "final_logit_softcapping", None)

    def embed(self, input_ids, positions):
        return self._embed(input_ids)

    def rotary(self, positions):
        # One (cos, sin) pair per layer type: sliding layers use the local RoPE base.
        dummy = self._embed.weight[:1]
        tables = {}
        for kind in set(self._layer_types):
            cos, sin = self._rotary(dummy, positions[None, :], kind)
            tables[kind] = (cos[0], sin[0])
        return tables

    def final_norm(self, h):
        return self._norm(h)

    def head(self, h):
        logits = self.head_logits(h)
        if self._softcap is not None:  # as transformers' Gemma3ForCausalLM
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits
