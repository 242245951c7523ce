"""The FLOP formula, written once.

Convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1;
also torch.utils.flop_counter): a matrix product of (m x k) by (k x n) costs 2*m*k*n
FLOPs (one multiply and one add per term). Counted: every decoder linear (Q, K, V, O,
MLP), attention scores Q.K^T and the weighted sum of values over the keys each query
actually sees, and the LM head over the rows whose logits are computed. Not counted
(as in torch's counter): norms, activations, softmax, RoPE, residual adds, embedding
look-ups. Mechanism probes are counted by the mechanism that runs them.
"""

from __future__ import annotations

from .spec import ArchSpec
from .errors import QuicksilverError, check_int


def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    """2 * rows * in * out."""
    return 2 * rows * in_features * out_features


def q_proj_flops(spec: ArchSpec, rows: int) -> int:
    return linear_flops(rows, spec.d_model, spec.q_dim)


def kv_proj_flops(spec: ArchSpec, rows: int) -> int:
    """K and V projections together."""
    return 2 * linear_flops(rows, spec.d_model, spec.kv_dim)


def o_proj_flops(spec: ArchSpec, rows: int) -> int:
    return linear_flops(rows, spec.q_dim, spec.d_model)


def mlp_flops(spec: ArchSpec, rows: int) -> int:
    """Gated (gate, up, down) or plain (fc, proj) MLP."""
    n_in = 2 if spec.gated_mlp else 1
    return n_in * linear_flops(rows, spec.d_model, spec.d_ff) + linear_flops(rows, spec.d_ff, spec.d_model)


def attention_flops(spec: ArchSpec, query_key_pairs: int) -> int:
    """Scores (q.k) plus weighted values (p.v), per head, over ``query_key_pairs`` seen pairs."""
    return 2 * 2 * spec.n_heads * spec.head_dim * query_key_pairs


def head_flops(spec: ArchSpec, rows: int) -> int:
    return linear_flops(rows, spec.d_model, spec.vocab_size)


def causal_pairs(seq_len: int, window: int | None = None) -> int:
    """Number of (query, key) pairs with key <= query (and query - key < window, if set)."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    # The first `window` queries see all their past; later ones see exactly `window` keys.
    return window * (window + 1) // 2 + (seq_len - window) * window


def dense_forward_flops(spec: ArchSpec, seq_len: int, head_rows: int | None = None, causal: bool = True) -> dict[str, int]:
    """FLOPs of one stock forward pass over ``seq_len`` tokens, by component.

    ``head_rows`` is how many rows go through the LM head (default: all). With
    ``causal=False`` attention is counted over all seq_len^2 pairs, which is what a
    dense eager implementation multiplies before masking (and what torch's counter sees).
    ``spec`` describes the architecture: ``quicksilver.adapters.arch_spec(model.config)`` (an
    engine holds the same as its ``spec`` attribute).
    """
    if not isinstance(spec, ArchSpec):
        raise QuicksilverError(f"spec must be an ArchSpec (quicksilver.adapters.arch_spec(model.config)), got {type(spec).__name__}")
    check_int("seq_len", seq_len, 1)
    check_int("head_rows", head_rows, 0, allow_none=True)
    head_rows = seq_len if head_rows is None else head_rows
    windows = spec.attn_windows or (None,) * spec.n_layers
    pairs = sum(causal_pairs(seq_len, w) if causal else seq_len * seq_len for w in windows)
    per_layer_linear = q_proj_flops(spec, seq_len) + kv_proj_flops(spec, seq_len) + o_proj_flops(spec, seq_len)
    out = {
        "projections": spec.n_layers * per_layer_linear,
        "mlp": spec.n_layers * mlp_flops(spec, seq_len),
        "attention": attention_flops(spec, pairs),
        "head": head_flops(spec, head_rows),
    }
    out["total"] = sum(out.values())
    return out
