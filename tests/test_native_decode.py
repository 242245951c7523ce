"""The native decode step behind the decode core: where it applies, it decodes what the eager step decodes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from quicksilver import Config, Engine, generate, native_decode
from quicksilver.native import step as native_step

pytestmark = pytest.mark.skipif(not native_step.available(), reason="no C compiler here")


def _model():
    # head_dim 16: the smallest the native step serves (tiny_llama's default 8 is not)
    return tiny_llama(seed=3, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("preset", ["off", "fast"])
def test_native_steps_decode_what_the_eager_steps_decode(monkeypatch, preset):
    model = _model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 99, (n,), generator=g) for n in (5, 13, 2)]
    native = Engine(model, preset)
    assert native_decode.native_step(native) is not None, native_decode.why_not(native)
    calls = []
    real = native_decode.step
    monkeypatch.setattr(native_decode, "step", lambda *a: calls.append(1) or real(*a))
    out = generate(native, prompts, 12)
    assert calls  # the pooled steps ran natively
    monkeypatch.setenv("QUICKSILVER_NATIVE_STEP", "0")
    eager = Engine(model, preset)
    assert native_decode.native_step(eager) is None
    ref = generate(eager, prompts, 12)
    assert out.tokens == ref.tokens
    assert out.ledger["flops"] == ref.ledger["flops"]  # the same work counted either way


@pytest.mark.parametrize("settings, why", [
    ({"halting": {"enabled": True, "min_layer": 1, "tail_layers": 1}}, "not a plain Llama-family decode step"),
    ({"amq": {"enabled": True, "uniform_bits": 8, "group_size": 32}}, "int8 per output channel"),
    ({"kv": {"enabled": True, "recent_window": 8}}, "not a plain Llama-family decode step"),
])
def test_where_the_native_step_does_not_apply(settings, why):
    engine = Engine(_model(), Config.from_dict(settings))
    assert native_decode.native_step(engine) is None and why in native_decode.why_not(engine)


def test_gpt2_and_head_dims_it_does_not_serve_run_eagerly():
    from conftest import tiny_gpt2

    assert native_decode.native_step(Engine(tiny_gpt2())) is None
    assert "shape not served" in native_decode.why_not(Engine(tiny_llama()))  # head_dim 8


@pytest.mark.parametrize("variant", ["qwen2", "phi3", "llama3"])
def test_families_the_compiled_step_serves_decode_natively_as_eagerly(monkeypatch, variant):
    """Qwen2 (q/k/v bias, tied head), Phi-3 (row views of fused weights), Llama-3 rope scaling: the
    native step reads the same weights and the model's own rotary tables."""
    from test_families import _ids, tiny

    model = tiny(variant)
    prompts = [_ids(6, 1), _ids(11, 2)]
    native = Engine(model)
    assert native_decode.native_step(native) is not None, native_decode.why_not(native)
    out = generate(native, prompts, 10)
    monkeypatch.setenv("QUICKSILVER_NATIVE_STEP", "0")
    assert out.tokens == generate(Engine(model), prompts, 10).tokens


def test_fast4_reads_the_q4_grid_natively_and_decodes_as_eagerly(monkeypatch):
    model = _model()
    native = Engine(model, "fast4")
    step = native_decode.native_step(native)
    assert step is not None and {lw.qkv.fmt for lw in step.layers} == {"q4"} and step.head.fmt == "i8"
    # the step's own 4-bit and int8 copies lie in one mapping (quicksilver.arena), and still decode as eagerly
    mats = [w for lw in step.layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down)] + [step.head]
    assert len({w.data.untyped_storage().data_ptr() for w in mats}) == 1
    prompts = [torch.randint(0, 99, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 9)]
    out = generate(native, prompts, 10)
    monkeypatch.setenv("QUICKSILVER_NATIVE_STEP", "0")
    assert out.tokens == generate(Engine(model, "fast4"), prompts, 10).tokens


def test_no_compile_is_measured_where_the_native_step_serves(monkeypatch):
    """A long generation (or a server's batch) with the native step must not pay a compile to measure
    the compiled loop, which the native step would run ahead of anyway."""
    from quicksilver import compiled
    from quicksilver.decoding.runner import wants_compiled

    monkeypatch.setenv("QUICKSILVER_COMPILE", "auto")
    measured = []
    monkeypatch.setattr(compiled, "measure", lambda engine, rows: measured.append(rows) or {"eager": 1.0, "compiled": 2.0})
    monkeypatch.setattr(compiled, "_eager_steps", 0)
    monkeypatch.setattr(compiled, "_steps", {})  # nothing compiled earlier in this process
    monkeypatch.setattr(compiled, "_failed", None)
    from quicksilver import kernels

    kernels.set_kernel_table(kernels.KernelTable(None))  # no choice measured by an earlier test
    try:
        native = Engine(_model(), "off")
        assert native_decode.native_step(native) is not None
        assert not wants_compiled(native, 8, 100_000) and measured == []
        monkeypatch.setenv("QUICKSILVER_NATIVE_STEP", "0")
        eager = Engine(_model(), "off")
        wants_compiled(eager, 8, 100_000)  # no native step: the compiled loop is measured, as before
        assert measured == [8]
    finally:
        kernels.set_kernel_table(None)


def test_a_changed_native_step_is_measured_again(monkeypatch):
    """The measured choices (native step against eager, kernels) are cached per machine key, which names
    the step library's build: a new step.c must not inherit the old one's measured verdict."""
    from quicksilver import kernels
    from quicksilver.native import step as native_step

    before = kernels.machine_key()
    monkeypatch.setattr(native_step, "build_id", lambda: "another-build")
    monkeypatch.setattr(native_step, "available", lambda: True)
    assert kernels.machine_key() != before
