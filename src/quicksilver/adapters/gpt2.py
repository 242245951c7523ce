"""GPT-2 family: fused c_attn (Conv1D, weights stored (in, out)), learned positions, LayerNorm, GELU."""

from __future__ import annotations

from ..errors import QuicksilverError
from .base import ArchSpec, FamilyAdapter, LayerParams, Linear


def arch_spec(config) -> ArchSpec:
    return ArchSpec(
        family="gpt2",
        n_layers=config.n_layer,
        d_model=config.n_embd,
        n_heads=config.n_head,
        n_kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        d_ff=config.n_inner or 4 * config.n_embd,
        gated_mlp=False,
        vocab_size=config.vocab_size,
        max_positions=config.n_positions,
        attn_windows=(None,) * config.n_layer,
    )


def _conv1d(weight, bias, start=None, stop=None) -> Linear:
    # Conv1D computes x @ W + b with W stored (in, out); the transpose is a view, not a copy.
    w = weight[:, start:stop].t()
    b = None if bias is None else bias[start:stop]
    return Linear(w, b)


class GPT2Adapter(FamilyAdapter):
    def __init__(self, model):
        config = model.config
        if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
            raise QuicksilverError("GPT-2 configs with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported")
        if getattr(config, "add_cross_attention", False):
            raise QuicksilverError("GPT-2 with cross-attention is not a causal LM this engine supports")
        self.model = model
        self.arch = spec = arch_spec(config)
        inner = model.transformer
        d = spec.d_model
        scale = spec.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.layers = []
        for block in inner.h:
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
            self.layers.append(
                LayerParams(
                    attn_norm=block.ln_1,
                    q=_conv1d(w, b, 0, d),
                    k=_conv1d(w, b, d, 2 * d),
                    v=_conv1d(w, b, 2 * d, 3 * d),
                    o=_conv1d(block.attn.c_proj.weight, block.attn.c_proj.bias),
                    mlp_norm=block.ln_2,
                    mlp_linears=(
                        _conv1d(block.mlp.c_fc.weight, block.mlp.c_fc.bias),
                        _conv1d(block.mlp.c_proj.weight, block.mlp.c_proj.bias),
                    ),
                    act=block.mlp.act,
                    attn_scale=scale,
                    qkv=_conv1d(w, b),  # c_attn is q, k and v already
                )
            )
        self._wte, self._wpe, self._ln_f, self._head = inner.wte, inner.wpe, inner.ln_f, model.lm_head

    def embed(self, input_ids, positions):
        return self._wte(input_ids) + self._wpe(positions)

    def final_norm(self, h):
        return self._ln_f(h)

    def head(self, h):
        return self.head_logits(h)
