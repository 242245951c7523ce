"""Llama family (Llama-2/3, SmolLM2, TinyLlama): RMSNorm, RoPE, grouped-query attention, SwiGLU.

``LlamaAdapter`` also reads the families that keep Llama's layout and differ in a few places
(Qwen2, Qwen3, Mistral: their own modules subclass it and say what differs). RoPE comes from
the model's own rotary module, so every ``rope_scaling`` type transformers knows (``llama3``,
``yarn``, ``longrope``, ``dynamic``, ...) gives the cos/sin tables the stock model uses.
"""

from __future__ import annotations

from ..errors import QuicksilverError
from .base import ArchSpec, FamilyAdapter, LayerParams, Linear, fused_linear

# transformers' RMSNorm modules that compute exactly Llama's norm (float32 statistics, weight in the
# model dtype): the compiled decode step (``compiled.rms``) recomputes them from their weights.
PLAIN_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})


def no_windows(config) -> tuple[None, ...]:
    """Llama: every layer attends to its whole past."""
    return (None,) * config.num_hidden_layers


def bounded(window: int | None, config) -> int | None:
    """A sliding window that can bind: one at least as long as the model's context never drops a key
    (the engine refuses sequences past ``max_position_embeddings``), so it is no window at all, and
    the layer keeps the plain causal path (and the compiled decode step). Phi-3.5 ships 262,144 with
    a 131,072-token context."""
    return window if window is not None and window < config.max_position_embeddings else None


def uniform_window(config) -> tuple[int | None, ...]:
    """Mistral and Phi-3: ``config.sliding_window`` (or None) on every layer, as their masks apply it."""
    return (bounded(getattr(config, "sliding_window", None), config),) * config.num_hidden_layers


def layer_type_windows(config) -> tuple[int | None, ...]:
    """Qwen2 and Qwen3: ``sliding_window`` on the layers ``config.layer_types`` marks sliding (with
    ``use_sliding_window``, from ``max_window_layers`` on), full attention elsewhere."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    window = bounded(getattr(config, "sliding_window", None), config)
    return tuple(window if t == "sliding_attention" else None for t in types[:n])


def arch_spec(config, family: str = "llama", windows=no_windows) -> ArchSpec:
    """The shape of a Llama-layout model; ``windows(config)`` gives each layer's sliding window."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ArchSpec(
        family=family,
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        d_ff=config.intermediate_size,
        gated_mlp=True,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        attn_windows=windows(config),
    )


def linear(module) -> Linear:
    return Linear(module.weight, module.bias)


def rms_eps(*norms) -> float | None:
    """The epsilon shared by plain RMSNorm modules (``PLAIN_RMS_NORMS``); None for any other norm."""
    eps = {getattr(n, "variance_epsilon", None) for n in norms}
    plain = all(type(n).__name__ in PLAIN_RMS_NORMS for n in norms)
    return eps.pop() if plain and len(eps) == 1 and None not in eps else None


class LlamaAdapter(FamilyAdapter):
    """Llama's layout: ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``.

    Subclasses set ``family`` and ``windows`` and may override ``attention`` (how a layer's q/k/v
    and QK-norm are read) and ``feed_forward`` (its gate/up/down).
    """

    family = "llama"
    windows = staticmethod(no_windows)

    def __init__(self, model):
        config = model.config
        if getattr(config, "pretraining_tp", 1) not in (1, None):
            raise QuicksilverError(f"{self.family} checkpoints with pretraining_tp > 1 are not supported")
        if config.hidden_act not in ("silu", "swish"):
            raise QuicksilverError(f"{self.family} activation {config.hidden_act!r} is not supported (silu only)")
        self.model = model
        self.arch = arch_spec(config, self.family, self.windows)
        inner = model.model
        self._rotary = inner.rotary_emb
        self.layers = [self._layer(layer, window) for layer, window in zip(inner.layers, self.arch.attn_windows)]
        self._embed = inner.embed_tokens
        self._norm = inner.norm
        self._head = model.lm_head
        # The final norm's weight when it is RMSNorm with the layers' epsilon (what a native step runs).
        self.final_rms_weight = inner.norm.weight if rms_eps(inner.norm) == self.layers[0].rms_eps else None

    def attention(self, attn) -> dict:
        """q, k, v, o (with their biases, Qwen2's q/k/v have one) and the fused qkv of a layer."""
        q, k, v = linear(attn.q_proj), linear(attn.k_proj), linear(attn.v_proj)
        return {"q": q, "k": k, "v": v, "o": linear(attn.o_proj), "qkv": fused_linear([q, k, v])}

    def feed_forward(self, mlp) -> dict:
        """The gated MLP's (gate, up, down) linears, its activation and the fused gate_up."""
        gate, up = linear(mlp.gate_proj), linear(mlp.up_proj)
        return {"mlp_linears": (gate, up, linear(mlp.down_proj)), "act": mlp.act_fn, "gate_up": fused_linear([gate, up])}

    def _layer(self, layer, window) -> LayerParams:
        attn = layer.self_attn
        return LayerParams(
            attn_norm=layer.input_layernorm,
            mlp_norm=layer.post_attention_layernorm,
            attn_scale=attn.scaling,
            window=window,
            rms_weights=(layer.input_layernorm.weight, layer.post_attention_layernorm.weight),
            rms_eps=rms_eps(layer.input_layernorm, layer.post_attention_layernorm),
            **self.attention(attn),
            **self.feed_forward(layer.mlp),
        )

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
