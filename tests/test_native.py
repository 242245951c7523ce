"""The native decode matmuls: the same function as the reference, rows independent, safe fallback."""

from __future__ import annotations

import pytest
import torch

from quicksilver.decoding import generate
from quicksilver import attn_kernels as AK
from quicksilver import kernels as K
from quicksilver import native
from quicksilver.quant import quantize_int8, snr_db

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.why_not()}")


def _case(rows, out_f=96, in_f=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    x = (torch.randn(rows, in_f, generator=g) * 2).bfloat16()
    return w, x


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize("generic", [False, True])
def test_each_format_computes_its_weights(rows, generic):
    w, x = _case(rows)
    qw = quantize_int8(w)
    s = qw.scales[:, 0].float().contiguous()
    hi = qw.codes.to(torch.int32) >> 4
    cases = {
        "bf16": (w.bfloat16(), None, w.bfloat16().float()),
        "i8": (qw.codes, s, qw.codes.float() * s[:, None]),
        "u4": (native.pack_u4(qw.codes), s, (16 * hi + 8).float() * s[:, None]),
    }
    for fmt, (weight, scale, ref_w) in cases.items():
        ref = x.float() @ ref_w.T
        out = native.linear(fmt, weight, scale, x, generic=generic)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, w.shape[0])
        # float32 accumulation, one rounding to bfloat16 at the end
        assert (out.float() - ref).abs().max() <= ref.abs().max() * 2**-8 + 1e-6, fmt


@needs_native
@pytest.mark.parametrize("fmt", ["bf16", "i8", "u4"])
def test_a_rows_output_does_not_depend_on_the_call(fmt):
    w, x = _case(11, out_f=512, in_f=1536)  # long sums, many outputs: a changed order of additions shows
    qw = quantize_int8(w)
    s = qw.scales[:, 0].float().contiguous()
    weight = {"bf16": w.bfloat16(), "i8": qw.codes, "u4": native.pack_u4(qw.codes)}[fmt]
    scale = None if fmt == "bf16" else s
    together = native.linear(fmt, weight, scale, x)
    alone = torch.cat([native.linear(fmt, weight, scale, x[i : i + 1]) for i in range(11)])
    assert torch.equal(together, alone)


@needs_native
def test_unsupported_shapes_are_refused_and_not_offered():
    w, x = _case(2, out_f=98, in_f=192)
    with pytest.raises(ValueError, match="unsupported shape"):
        native.linear("bf16", w.bfloat16(), None, x)
    assert not native.applies(98, 192) and not native.applies(96, 100) and native.applies(96, 192)
    qw = quantize_int8(w)
    nw = K.NestedWeight(qw.codes, qw.scales, None)
    assert not any(n.startswith("native") for n in K.candidates(nw, 8, torch.bfloat16))
    assert K.dense_candidates(w.bfloat16(), torch.bfloat16) == ["torch"]


@needs_native
def test_the_u4_operand_is_half_the_bytes_of_the_codes_and_decodes_back():
    qw = quantize_int8(torch.randn(8, 128))
    packed = native.pack_u4(qw.codes)
    assert packed.dtype == torch.uint8 and packed.numel() == qw.codes.numel() // 2
    blocks = packed.reshape(8, 2, 32).to(torch.int32)
    u = torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(8, 128)
    assert torch.equal(u - 8, qw.codes.to(torch.int32) >> 4)


@needs_native
def test_dense_dispatch_matches_torch_and_memoizes(tmp_path, monkeypatch):
    monkeypatch.delenv("QUICKSILVER_KERNELS", raising=False)
    w, x = _case(2)  # bucket 1
    wb = w.bfloat16()
    table = K.KernelTable(tmp_path / "k.json")
    table.entries[f"dense/{wb.shape[0]}x{wb.shape[1]}/bfloat16"] = {"1": {"torch": 9.0, "native16": 1.0},
                                                                     "8": {"torch": 1.0, "native16": 9.0}}
    K.set_kernel_table(table)
    try:
        memo = {}
        out = K.dense(wb, None, x, memo)
        assert list(memo.values()) == ["native16"]
        assert snr_db(x.float() @ wb.float().T, out.float()) > 38
        out3 = K.dense(wb, None, x.reshape(1, 2, -1), memo)  # leading dims kept
        assert out3.shape == (1, 2, 96) and torch.equal(out3[0], out)
        K.dense(wb, None, torch.cat([x] * 3), memo)  # 6 rows: bucket 8
        assert memo[next(k for k in memo if k[-1] == 6)] == "torch"
    finally:
        K.set_kernel_table(None)


def test_without_a_compiler_nothing_native_is_offered(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    qw = quantize_int8(torch.randn(96, 192))
    nw = K.NestedWeight(qw.codes, qw.scales, None)
    assert not any(n.startswith("native") for n in K.candidates(nw, 8, torch.bfloat16))
    assert K.dense_candidates(torch.randn(96, 192).bfloat16(), torch.bfloat16) == ["torch"]
    with pytest.raises(RuntimeError, match="unavailable"):
        native.linear("bf16", torch.zeros(4, 64).bfloat16(), None, torch.zeros(1, 64).bfloat16())


def test_a_failed_build_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("QUICKSILVER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    try:
        assert native.library() is None and native.why_not().startswith("build failed")
        assert "unavailable" in native.describe()
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@needs_native
@pytest.mark.parametrize("B,T", [(1, 7), (3, 70)])
def test_decode_attention_matches_float32_eager_attention(B, T):
    g = torch.Generator().manual_seed(1)
    cap, H, Hkv, hd = T + 9, 6, 2, 64
    kbuf = torch.randn(B, Hkv, cap, hd, generator=g).bfloat16()  # a head-major cache with spare capacity
    vbuf = torch.randn(B, Hkv, cap, hd, generator=g).bfloat16()
    keys, values = kbuf[:, :, :T], vbuf[:, :, :T]
    q = torch.randn(B, H, hd, generator=g).bfloat16()
    mask = torch.zeros(B, T, dtype=torch.bfloat16)
    mask[0, : T // 3] = float("-inf")  # a padded row
    ref = AK.attend_matmul(q.float(), keys.float(), values.float(), mask.float(), hd**-0.5)
    out = native.decode_attention(q, keys, values, mask, hd**-0.5)
    assert out.shape == (B, H * hd) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=2**-7)
    alone = torch.cat([native.decode_attention(q[b : b + 1], keys[b : b + 1], values[b : b + 1], mask[b : b + 1], hd**-0.5)
                       for b in range(B)])
    assert torch.equal(out, alone)


@needs_native
def test_decode_attention_falls_back_where_the_layout_does_not_fit(monkeypatch):
    monkeypatch.setattr(AK, "attention_kernel", lambda *a: "native")
    q = torch.randn(2, 4, 64).bfloat16()
    keys = torch.randn(2, 2, 64, 10).bfloat16().transpose(2, 3)  # positions not contiguous rows
    values = torch.randn(2, 2, 10, 64).bfloat16()
    assert not native.attention_applies(keys, values)
    torch.testing.assert_close(AK.decode_attention(q, keys, values, None, 0.125),
                               AK.attend_matmul(q, keys, values, None, 0.125))


@needs_native
@pytest.mark.parametrize("T", [2, 37, 130])
def test_causal_attention_matches_float32_attention(T):
    if not native.causal_applies(torch.zeros(1, 4, 64).bfloat16(), torch.zeros(1, 2, 64).bfloat16()):
        pytest.skip("the flash kernel needs the AVX-512 BF16 build")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(T, h, 64, generator=g).bfloat16() for h in (6, 2, 2))
    ref = AK.attend_causal_sdpa(q.float(), k.float(), v.float(), 0.125)
    out = native.causal_attention(q, k, v, 0.125)
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=2**-7)
    # causal: the first rows do not change when later tokens do
    k2, v2 = k.clone(), v.clone()
    k2[T // 2 :] += 1
    v2[T // 2 :] -= 1
    assert torch.equal(native.causal_attention(q, k2, v2, 0.125)[: T // 2], out[: T // 2])


@needs_native
def test_the_engine_decodes_through_the_native_kernels_in_bfloat16(monkeypatch):
    from quicksilver.config import Config
    from quicksilver.engine import Engine

    from conftest import tiny_llama

    # widths the native tiles serve: in % 64, out % 4, head dim 64
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                       vocab_size=100).to(torch.bfloat16)
    prompt = torch.randint(0, 100, (9,))
    calls = {"linear": 0, "attention": 0}
    linear, attention = native.linear, native.decode_attention

    def count(name, f):
        def wrapped(*a, **k):
            calls[name] += 1
            return f(*a, **k)
        return wrapped

    monkeypatch.setattr(native, "linear", count("linear", linear))
    monkeypatch.setattr(native, "decode_attention", count("attention", attention))
    monkeypatch.setenv("QUICKSILVER_NATIVE_STEP", "0")  # the per-kernel path, not the whole native step
    for cfg in (Config(), Config.preset("fast")):
        K.set_kernel_table(None)  # fresh choices under the counting wrappers
        out = generate(Engine(model, cfg), prompt, 6)
        assert len(out.tokens[0]) == 6
    assert calls["linear"] > 0 and calls["attention"] > 0
    # the same step through torch's kernels only: the same function, up to bfloat16 rounding
    monkeypatch.setattr(native, "library", lambda: None)
    K.set_kernel_table(None)
    ids = prompt[None]
    ref = Engine(model)(ids).logits.float()
    monkeypatch.undo()
    K.set_kernel_table(None)
    got = Engine(model)(ids).logits.float()  # prefill rows > 8: torch kernels, native causal attention
    assert snr_db(ref, got) > 30


def test_a_build_covers_the_files_its_source_includes(tmp_path):
    """step.c includes step_matmul.h: a change to the included file is a new build (a new library
    path, so the cached one is not reused, and a new build id for the measured kernel choices)."""
    (tmp_path / "part.h").write_text("static int f(void) { return 1; }\n")
    source = tmp_path / "main.c"
    source.write_text('#include "part.h"\nint g(void) { return f(); }\n')
    before = native._library_path("cc", source)
    (tmp_path / "part.h").write_text("static int f(void) { return 2; }\n")
    assert native._library_path("cc", source) != before
    assert native._library_path("cc", source) == native._library_path("cc", source)  # the same files: the same build
