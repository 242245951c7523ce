"""Attention kernels of the engine, chosen per shape by measurement like the matmuls (``kernels``).

Decode attention (one query row per sequence against its cached keys) and prefill attention
(causal self-attention of one sequence): torch's fused SDPA, two plain matmuls and a softmax, or
the native kernels (``quicksilver.native``), whichever measured fastest on this machine.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .kernels import kernel_table, table_generation, time_call


# --- Decode attention: one query row per sequence against its cached keys -------------------------
#
# torch's fused SDPA for CPU is a flash kernel built for blocks of queries. For one query row in
# bfloat16 it measured 2-9x slower than two plain matmuls and a softmax (the stock model's own
# "eager" attention) on a 2-core AVX-512 BF16 CPU (B=8, 256 keys: 1,065 vs 129 microseconds per
# layer over head-major keys), while in float32 it was the faster one. So this choice is measured too.

ATTN_ROWS = (1, 8, 64)
ATTN_KEYS = (128, 1024, 8192)


def attend_sdpa(q, keys, values, mask, scale):
    """q (B, H, hd); keys/values (B, Hkv, T, hd), possibly strided views; mask (B, T) additive or None."""
    m = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=m, scale=scale,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out.reshape(q.shape[0], -1)


def attend_matmul(q, keys, values, mask, scale):
    """The same attention as two batched matmuls and a float32 softmax (transformers' eager attention)."""
    B, H, hd = q.shape
    Hkv = keys.shape[1]
    qg = q.view(B, Hkv, H // Hkv, hd)  # a query head's group shares its key head (GQA)
    scores = torch.matmul(qg, keys.transpose(2, 3)).float() * scale  # (B, Hkv, G, T)
    if mask is not None:
        scores = scores + mask.float()[:, None, None, :]
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(p, values).reshape(B, H * hd)


def attend_native(q, keys, values, mask, scale):
    """The same attention in C (``quicksilver.native``): float32 scores, softmax and sum."""
    from . import native

    return native.decode_attention(q, keys, values, mask, scale)


ATTENTION_KERNELS = {"sdpa": attend_sdpa, "matmul": attend_matmul, "native": attend_native}


def attention_candidates(dtype) -> list[str]:
    if dtype != torch.bfloat16:
        return ["sdpa", "matmul"]
    from . import native

    return ["sdpa", "matmul", "native"] if native.available() else ["sdpa", "matmul"]


def _attn_bucket(n: int, buckets) -> int:
    return min(buckets, key=lambda b: abs(math.log(max(n, 1) / b)))


def measure_attention(H: int, Hkv: int, hd: int, rows: int, keys: int, dtype) -> dict[str, float]:
    """Microseconds of each decode-attention kernel at ``rows`` sequences of ``keys`` cached entries."""
    q = torch.randn(rows, H, hd, dtype=dtype)
    kv = torch.randn(2, rows, Hkv, keys, hd, dtype=dtype)
    mask = torch.zeros(rows, keys, dtype=dtype) if rows > 1 else None
    return {name: time_call(lambda f=ATTENTION_KERNELS[name]: f(q, kv[0], kv[1], mask, hd**-0.5)) * 1e6
            for name in attention_candidates(dtype)}


_ATTN_CHOICE: dict = {}  # (table, H, Hkv, hd, rows, keys, dtype) -> kernel: the layers of one step ask the same question


def attention_kernel(H: int, Hkv: int, hd: int, rows: int, keys: int, dtype) -> str:
    """The decode-attention kernel measured fastest on this machine for this shape (cached)."""
    shape = (table_generation(), H, Hkv, hd, rows, keys, dtype)
    name = _ATTN_CHOICE.get(shape)
    if name is None:
        name = _ATTN_CHOICE[shape] = _attention_kernel(H, Hkv, hd, rows, keys, dtype)
    return name


def _attention_kernel(H: int, Hkv: int, hd: int, rows: int, keys: int, dtype) -> str:
    names = attention_candidates(dtype)
    if os.environ.get("QUICKSILVER_KERNELS") == "unmeasured":  # tests run every kernel: float32 and bfloat16 cases
        return "sdpa" if dtype == torch.float32 else names[-1]
    b, t = _attn_bucket(rows, ATTN_ROWS), _attn_bucket(keys, ATTN_KEYS)
    k = f"attention/{H}x{Hkv}x{hd}/{str(dtype).removeprefix('torch.')}"
    return kernel_table().fastest(k, f"{b}x{t}", names, lambda: measure_attention(H, Hkv, hd, b, t, dtype))


def decode_attention(q, keys, values, mask, scale):
    """One query row per sequence: q (B, H, hd) against keys/values (B, Hkv, T, hd), head-major as
    the cache stores them; mask (B, T) additive or None (every entry live). Returns (B, H * hd),
    through the kernel measured fastest."""
    name = attention_kernel(q.shape[1], keys.shape[1], q.shape[2], q.shape[0], keys.shape[2], q.dtype)
    if name == "native":
        from . import native

        if not native.attention_applies(keys, values):
            name = "matmul"
    return ATTENTION_KERNELS[name](q, keys, values, mask, scale)


# --- Prefill attention: causal self-attention of one sequence ------------------------------------
#
# torch's fused CPU attention ran at about a third of the bf16 matmul rate on a 2-core AVX-512
# BF16 CPU (4,096 tokens: 164 ms per layer, against 77 ms for the native flash kernel), and at
# 4,096 tokens attention is over half of a prefill. Measured per length bucket, like the rest.

CAUSAL_T = (64, 512, 4096)


def attend_causal_sdpa(q, k, v, scale):
    """q (T, H, hd), k/v (T, Hkv, hd) -> (T, H * hd) through torch's fused kernel."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def attend_causal_native(q, k, v, scale):
    from . import native

    return native.causal_attention(q, k, v, scale)


CAUSAL_KERNELS = {"sdpa": attend_causal_sdpa, "native": attend_causal_native}


def measure_causal(H: int, Hkv: int, hd: int, T: int, dtype) -> dict[str, float]:
    q, k, v = torch.randn(T, H, hd, dtype=dtype), torch.randn(T, Hkv, hd, dtype=dtype), torch.randn(T, Hkv, hd, dtype=dtype)
    return {name: time_call(lambda f=f: f(q, k, v, hd**-0.5), reps=5, budget_s=0.5) * 1e6 for name, f in CAUSAL_KERNELS.items()}


def causal_kernel(H: int, Hkv: int, hd: int, T: int, dtype) -> str:
    """The causal-attention kernel measured fastest here for about ``T`` tokens (cached)."""
    shape = ("causal", table_generation(), H, Hkv, hd, _attn_bucket(T, CAUSAL_T), dtype)
    name = _ATTN_CHOICE.get(shape)
    if name is None:
        if os.environ.get("QUICKSILVER_KERNELS") == "unmeasured":
            name = "native"  # tests run the native kernel wherever it applies
        else:
            k = f"causal/{H}x{Hkv}x{hd}/{str(dtype).removeprefix('torch.')}"
            bucket = _attn_bucket(T, CAUSAL_T)
            name = kernel_table().fastest(k, str(bucket), list(CAUSAL_KERNELS), lambda: measure_causal(H, Hkv, hd, bucket, dtype))
        _ATTN_CHOICE[shape] = name
    return name


def causal_attention(q, k, v, scale):
    """Causal self-attention of one sequence, q (T, H, hd), k/v (T, Hkv, hd) -> (T, H * hd), through
    the kernel measured fastest (the native one only for bfloat16, head dim 64, AVX-512 BF16)."""
    from . import native

    if q.shape[0] > 1 and native.causal_applies(q, k) and \
            causal_kernel(q.shape[1], k.shape[1], q.shape[2], q.shape[0], q.dtype) == "native":
        return attend_causal_native(q, k, v, scale)
    return attend_causal_sdpa(q, k, v, scale)
