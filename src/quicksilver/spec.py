"""A model's shape: what the FLOP ledger, the engine and the caches need to know of it.

Ground-level (no torch modules, no transformers): each family adapter builds one from its HF config
(``quicksilver.adapters.arch_spec``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    """Shape facts that the FLOP ledger and the engine need.

    ``attn_windows[l]`` is the sliding-window size of layer l's attention, or None for
    full causal attention (Gemma-3 alternates them; GPT-2 and Llama use None).
    """

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    gated_mlp: bool
    vocab_size: int
    max_positions: int
    attn_windows: tuple[int | None, ...] = field(default=())

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim
