"""The native decode step: the same step as its torch reference, rows independent, a clear refusal.

The bound for float32 activations: every output (logits, hidden states, cache entries) within
1e-5 of the largest reference value of its kind (max |native - reference| <= 1e-5 * max |reference|):
both compute in float32 from the same weights and differ only in the order of additions. With
bfloat16 activations the arithmetic is the same float32, and what is stored in bfloat16 (the cache
entries, the hidden states handed back) may differ by one rounding: 2^-8 of the largest value.
"""

from __future__ import annotations

import gc

import pytest
import torch

from quicksilver import native
from quicksilver.native import step as S
from quicksilver.quant import quantize_int8
from quicksilver.quant_q4 import quantize_q4

needs_step = pytest.mark.skipif(not S.available(), reason=f"native step: {S.why_not()}")
FORMATS = ("f32", "bf16", "i8", "q4")
TINY = S.StepShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, eps=1e-5, attn_scale=0.25)
REAL = S.StepShape(n_layers=1, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, eps=1e-5, attn_scale=0.125)


def weight(out_f: int, in_f: int, fmt: str, g: torch.Generator, bias: bool = False) -> S.LinearWeight:
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) * 0.1 if bias else None
    if fmt == "f32":
        return S.LinearWeight.dense(w, b)
    if fmt == "bf16":
        return S.LinearWeight.dense(w.bfloat16(), b)
    if fmt == "i8":
        q = quantize_int8(w)
        return S.LinearWeight.int8(q.codes, q.scales, b)
    return S.LinearWeight.q4(quantize_q4(w), b)


def model(shape: S.StepShape, fmt: str, seed: int = 0, vocab: int = 50):
    """Random layers, final norm and head of ``shape`` in weight format ``fmt``."""
    g = torch.Generator().manual_seed(seed)
    s = shape
    layers = [S.LayerWeights(weight(s.qkv_out, s.d_model, fmt, g, bias=True), weight(s.d_model, s.n_heads * s.head_dim, fmt, g),
                             weight(2 * s.d_ff, s.d_model, fmt, g), weight(s.d_model, s.d_ff, fmt, g),
                             1 + 0.1 * torch.randn(s.d_model, generator=g), 1 + 0.1 * torch.randn(s.d_model, generator=g))
              for _ in range(s.n_layers)]
    return layers, 1 + 0.1 * torch.randn(s.d_model, generator=g), weight(vocab, s.d_model, fmt, g)


def pool(shape: S.StepShape, rows: int, capacity: int, dtype, seed: int = 1):
    """A CachePool's buffers filled with random entries (what earlier steps wrote)."""
    g = torch.Generator().manual_seed(seed)
    kv = lambda: [torch.randn(rows, shape.n_kv_heads, capacity, shape.head_dim, generator=g).to(dtype)  # noqa: E731
                  for _ in range(shape.n_layers)]
    return kv(), kv(), [torch.randint(0, 999, (rows, capacity), generator=g) for _ in range(shape.n_layers)]


def inputs(shape: S.StepShape, counts: list[int], dtype, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    B = len(counts)
    positions = torch.tensor(counts) + 3  # true positions need not equal the entry index
    inv = 1.0 / (10000 ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim))
    ang = positions[:, None].float() * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)  # transformers' (B, hd) tables
    return torch.randn(B, shape.d_model, generator=g).to(dtype), ang.cos(), ang.sin(), positions


def run_both(shape, fmt, counts, slots, dtype=torch.float32, head=True, capacity=24, rows=4, per_layer=False):
    layers, final_norm, head_w = model(shape, fmt)
    if not head:
        final_norm = head_w = None
    step = S.NativeStep(shape, layers, dtype, final_norm=final_norm, head=head_w)
    h, cos, sin, positions = inputs(shape, counts, dtype)
    k, v, pos = pool(shape, rows, capacity, dtype)
    k2, v2, pos2 = ([t.clone() for t in ts] for ts in (k, v, pos))
    c = torch.tensor([counts] * shape.n_layers) if per_layer else counts
    ref = S.reference_step(shape, layers, h, cos, sin, positions, slots, c, k2, v2, pos2, final_norm, head_w,
                           round_inputs=step.rounds_matmul_inputs)
    h_native = h.clone()
    out = step(h_native, cos, sin, positions, slots, c, step.bind(k, v, pos))
    return out, ref, (k, v, pos), (k2, v2, pos2)


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return float((a.float() - b.float()).abs().max()) <= rel * float(b.float().abs().max())


@needs_step
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("counts,slots", [([7], [2]), ([5, 0, 19], [3, 0, 1])])  # B=1; B=3 with ragged caches
def test_the_native_step_equals_the_torch_reference_in_float32(fmt, counts, slots):
    logits, ref, caches, ref_caches = run_both(TINY, fmt, counts, slots)
    assert logits.shape == (len(counts), 50) and logits.dtype == torch.float32
    assert close(logits, ref, 1e-5)
    for ours, theirs in zip(caches[0] + caches[1], ref_caches[0] + ref_caches[1]):
        assert close(ours, theirs, 1e-5)
    for ours, theirs in zip(caches[2], ref_caches[2]):
        assert torch.equal(ours, theirs)  # positions written exactly


@needs_step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_caches_attend_in_chunks_merged_exactly(dtype):
    """Attention runs over chunks of 64 entries merged with their softmax weights: 1, 2 and 4 chunks."""
    counts = [200, 63, 64, 0]  # entries 0..count: 4, 1, 2 and 1 chunks
    logits, ref, caches, ref_caches = run_both(TINY, "f32", counts, [1, 0, 3, 2], dtype=dtype, capacity=256)
    assert close(logits, ref, 1e-5)
    rel = 1e-5 if dtype == torch.float32 else 2**-8
    for ours, theirs in zip(caches[0] + caches[1], ref_caches[0] + ref_caches[1]):
        assert close(ours, theirs, rel)


@needs_step
def test_only_the_new_entries_are_written():
    counts, slots = [5, 0, 19], [3, 0, 1]
    _, _, (k, v, pos), _ = run_both(TINY, "f32", counts, slots)
    k0, v0, pos0 = pool(TINY, 4, 24, torch.float32)
    for l in range(TINY.n_layers):
        changed = (k[l] != k0[l]).any(dim=-1) | (v[l] != v0[l]).any(dim=-1)  # (rows, Hkv, capacity)
        expect = torch.zeros_like(changed)
        for b, s in enumerate(slots):
            expect[s, :, counts[b]] = True
        assert torch.equal(changed, expect)
        assert torch.equal(pos[l] != pos0[l], expect[:, 0])


@needs_step
def test_hidden_states_without_a_head_and_counts_per_layer():
    h, ref, _, _ = run_both(TINY, "q4", [5, 11], [1, 0], head=False, per_layer=True)
    assert h.shape == (2, TINY.d_model) and close(h, ref, 1e-5)


@needs_step
@pytest.mark.parametrize("fmt", ["bf16", "i8", "q4"])
def test_bfloat16_activations_store_bfloat16_and_compute_float32(fmt):
    logits, ref, caches, ref_caches = run_both(TINY, fmt, [5, 0, 19], [3, 0, 1], dtype=torch.bfloat16)
    assert close(logits, ref, 1e-5)
    for ours, theirs in zip(caches[0] + caches[1], ref_caches[0] + ref_caches[1]):
        assert ours.dtype == torch.bfloat16 and close(ours, theirs, 2**-8)
    h, ref_h, _, _ = run_both(TINY, fmt, [5, 0, 19], [3, 0, 1], dtype=torch.bfloat16, head=False)
    assert h.dtype == torch.bfloat16 and close(h, ref_h, 2**-8)


@needs_step
@pytest.mark.parametrize("fmt,dtype", [(f, torch.float32) for f in FORMATS] + [(f, torch.bfloat16) for f in FORMATS[1:]])
def test_a_rows_result_does_not_depend_on_the_batch(fmt, dtype):
    layers, final_norm, head = model(TINY, fmt)
    step = S.NativeStep(TINY, layers, dtype, final_norm=final_norm, head=head)
    counts = [5, 0, 19, 7, 2, 11, 3, 9, 1]  # 9 rows: tiles of 8 rows and of 1
    h, cos, sin, positions = inputs(TINY, counts, dtype)
    k, v, pos = pool(TINY, len(counts), 24, dtype)
    together = step(h.clone(), cos, sin, positions, range(len(counts)), counts, step.bind(k, v, pos))
    k, v, pos = pool(TINY, len(counts), 24, dtype)
    cache = step.bind(k, v, pos)
    alone = torch.cat([step(h[b : b + 1].clone(), cos[b : b + 1], sin[b : b + 1], positions[b : b + 1], [b], [counts[b]], cache)
                       for b in range(len(counts))])
    assert torch.equal(together, alone)


@needs_step
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 11])
def test_each_weight_format_computes_its_dequantized_weight(fmt, rows):
    g = torch.Generator().manual_seed(3)
    w = weight(12, 128, fmt, g, bias=True)
    x = torch.randn(rows, 128, generator=g)
    ref = x @ w.dequantized().T + w.bias
    assert close(S.matmul(w, x), ref, 1e-6)


@needs_step
@pytest.mark.parametrize("defines", [("QS_VW=4",), ("QS_VW=16",), ("QS_VW=4", "QS_PORTABLE=1")],
                         ids=["128-bit", "512-bit", "portable"])
def test_every_build_computes_the_same_step(defines):
    """The 128-bit build (SSE2 / NEON class machines), the 512-bit one (AVX-512), and the portable C of a
    CPU the compiler knows nothing of (no FMA, no F16C), all built here too."""
    if S.library(defines) is None:
        pytest.skip(f"the {defines} build: {S.why_not(defines)}")
    for fmt in FORMATS:
        layers, final_norm, head = model(TINY, fmt)
        h, cos, sin, positions = inputs(TINY, [5, 0, 19], torch.float32)
        outs = []
        for d in ((), defines):
            step = S.NativeStep(TINY, layers, torch.float32, final_norm=final_norm, head=head, defines=d)
            outs.append(step(h.clone(), cos, sin, positions, [0, 1, 2], [5, 0, 19], step.bind(*pool(TINY, 3, 24, torch.float32))))
        assert close(outs[1], outs[0], 1e-5), fmt


@needs_step
@pytest.mark.parametrize("fmt", ["f32", "q4"])
def test_the_default_models_shape(fmt):
    logits, ref, caches, ref_caches = run_both(REAL, fmt, [40, 3], [0, 1], capacity=48, rows=2)
    assert close(logits, ref, 1e-5)
    for ours, theirs in zip(caches[0], ref_caches[0]):
        assert close(ours, theirs, 1e-5)


def test_unavailable_when_switched_off_or_without_a_compiler(monkeypatch, tmp_path):
    layers, _, _ = model(TINY, "f32")
    try:
        monkeypatch.setenv("QUICKSILVER_NATIVE", "0")
        S._library.cache_clear()
        with pytest.raises(S.Unavailable, match="QUICKSILVER_NATIVE=0"):
            S.NativeStep(TINY, layers, torch.float32)
        monkeypatch.delenv("QUICKSILVER_NATIVE")
        monkeypatch.setenv("QUICKSILVER_CACHE", str(tmp_path))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        S._library.cache_clear()
        with pytest.raises(S.Unavailable, match="build failed"):
            S.NativeStep(TINY, layers, torch.float32)
        assert not S.available() and "unavailable" in S.describe()
    finally:
        monkeypatch.undo()
        S._library.cache_clear()
        native.library.cache_clear()


@needs_step
def test_shapes_and_weights_it_does_not_serve_are_refused():
    layers, _, _ = model(TINY, "f32")
    with pytest.raises(S.Unavailable, match="shape not served"):
        S.NativeStep(S.StepShape(2, 64, 4, 3, 16, 96, 1e-5, 0.25), layers, torch.float32)  # 4 heads over 3 KV heads
    with pytest.raises(S.Unavailable, match="shape not served"):
        S.NativeStep(S.StepShape(2, 64, 8, 4, 8, 96, 1e-5, 0.25), layers, torch.float32)  # head_dim % 16
    with pytest.raises(S.Unavailable, match="layer 0 gate_up"):
        odd = [S.LayerWeights(lw.qkv, lw.o, S.LinearWeight.dense(torch.zeros(190, 64)), lw.down, lw.attn_norm, lw.mlp_norm)
               for lw in layers]
        S.NativeStep(TINY, odd, torch.float32)
    with pytest.raises(S.Unavailable, match="not served"):
        S.NativeStep(S.StepShape(2, 64, 4, 2, 16, 90, 1e-5, 0.25), layers, torch.float32)  # d_ff % 32
    with pytest.raises(S.Unavailable, match="float16"):
        S.LinearWeight.dense(torch.zeros(4, 32, dtype=torch.float16))
    with pytest.raises(S.Unavailable, match="float32 or bfloat16"):
        S.NativeStep(TINY, layers, torch.float16)


@needs_step
def test_logits_into_a_given_buffer_and_a_reused_scratch():
    layers, final_norm, head = model(TINY, "q4")
    step = S.NativeStep(TINY, layers, torch.float32, final_norm=final_norm, head=head)
    h, cos, sin, positions = inputs(TINY, [5, 30], torch.float32)
    first = step(h.clone(), cos, sin, positions, [0, 1], [5, 30], step.bind(*pool(TINY, 2, 64, torch.float32)))
    out = torch.full((2, 50), float("nan"))
    again = step(h.clone(), cos, sin, positions, [0, 1], [5, 30], step.bind(*pool(TINY, 2, 64, torch.float32)), out=out)
    assert again is out and torch.equal(out, first)
    with pytest.raises(ValueError, match="out must be"):
        step(h.clone(), cos, sin, positions, [0, 1], [5, 30], step.bind(*pool(TINY, 2, 64, torch.float32)), out=out[:1])


@needs_step
def test_bad_calls_are_refused_before_anything_is_written():
    layers, _, _ = model(TINY, "f32")
    step = S.NativeStep(TINY, layers, torch.float32)
    k, v, pos = pool(TINY, 2, 8, torch.float32)
    before = [t.clone() for t in k]
    cache = step.bind(k, v, pos)
    h, cos, sin, positions = inputs(TINY, [8, 1], torch.float32)
    with pytest.raises(ValueError, match="full"):
        step(h, cos, sin, positions, [0, 1], [8, 1], cache)  # row 0's cache holds 8 entries already
    with pytest.raises(ValueError, match="full or out of the pool"):
        step(h, cos, sin, positions, [0, 2], [1, 1], cache)
    with pytest.raises(ValueError, match="contiguous"):
        step(h.bfloat16(), cos, sin, positions, [0, 1], [1, 1], cache)
    with pytest.raises(ValueError, match="cache buffers"):
        step.bind([t.bfloat16() for t in k], v, pos)
    assert all(torch.equal(a, b) for a, b in zip(k, before))


@needs_step
def test_the_vector_lane_sum_is_the_scalar_trees_sum_bit_for_bit():
    """hsum in vector shuffles adds the same pairs in the same order as the scalar tree (HSUM_SCALAR)."""
    for fmt in FORMATS:
        layers, final_norm, head = model(TINY, fmt)
        h, cos, sin, positions = inputs(TINY, [5, 0, 19, 70], torch.float32)
        outs = [S.NativeStep(TINY, layers, torch.float32, final_norm=final_norm, head=head, defines=d)
                for d in ((), ("HSUM_SCALAR=1",))]
        got = [s(h.clone(), cos, sin, positions, [0, 1, 2, 3], [5, 0, 19, 70], s.bind(*pool(TINY, 4, 96, torch.float32)))
               for s in outs]
        assert torch.equal(got[0], got[1]), fmt


@needs_step
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_step_keeps_its_own_weights_when_another_step_is_built_from_the_same_ones(fmt):
    layers, final_norm, head = model(TINY, fmt)
    h, cos, sin, positions = inputs(TINY, [5, 0, 19], torch.float32)
    first = S.NativeStep(TINY, layers, torch.float32, final_norm=final_norm, head=head)
    run = lambda s: s(h.clone(), cos, sin, positions, [0, 1, 2], [5, 0, 19], s.bind(*pool(TINY, 3, 24, torch.float32)))  # noqa: E731
    before = run(first)
    for _ in range(3):
        S.NativeStep(TINY, layers, torch.float32, final_norm=final_norm, head=head)
    gc.collect()
    assert torch.equal(run(first), before)
