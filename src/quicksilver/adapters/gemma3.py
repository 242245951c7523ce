"""Gemma-3 text models: shape only (for the FLOP ledger of baseline evaluation).

The token-level engine does not run Gemma-3 yet (sliding-window layers, q/k norms,
sandwich norms and a scaled embedding would need their own primitives).
"""

from __future__ import annotations

from .base import ArchSpec


def arch_spec(config) -> ArchSpec:
    config = getattr(config, "text_config", None) or config
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
