"""Qwen2, Qwen3, Mistral, Phi-3 and Llama with scaled RoPE in the engine, on tiny random configs.

Each variant is built once per module (hidden 64, 4 layers, seeded; norm weights and biases
randomized, as HF initializes them to ones and zeros, which would hide a wrong convention):

- ``qwen2``: q/k/v biases, tied embeddings; ``qwen2-sliding``: sliding layers from layer 2 on;
- ``qwen3``: per-head QK-norm;
- ``mistral``: a 6-key sliding window (the tests run 37-40 tokens);
- ``phi3``: fused qkv/gate_up weights; ``phi3-longrope``: longrope scaling that switches to its
  long factors past position 16, and a partial rotary factor (12 of 16 head dims rotate);
- ``llama3``: Llama with ``rope_scaling`` llama3.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from quicksilver import compiled, kernels
from quicksilver.adapters import arch_spec
from quicksilver.adapters.base import Linear
from quicksilver.config import PRESETS, Config
from quicksilver.engine import Engine
from quicksilver.flops import dense_forward_flops
from quicksilver.decoding import decode_one_token, generate, new_caches, prefill_batch

transformers = pytest.importorskip("transformers")

VOCAB = 99
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2, attn_implementation="sdpa")
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 16,
            "short_factor": [1.0 + 0.2 * i for i in range(6)], "long_factor": [2.0 + 0.7 * i for i in range(6)]}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 10000.0}
VARIANTS = {
    "qwen2": ("Qwen2", {"tie_word_embeddings": True}),
    "qwen2-sliding": ("Qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2}),
    "qwen3": ("Qwen3", {"head_dim": 16}),
    "mistral": ("Mistral", {"sliding_window": 6}),
    "phi3": ("Phi3", {}),
    "phi3-longrope": ("Phi3", {"rope_scaling": LONGROPE, "partial_rotary_factor": 0.75}),
    "llama3": ("Llama", {"rope_scaling": LLAMA3}),
}
# What each variant's distinguishing setting is without it (the same weights): the stock model's
# logits change, so the equality tests below really exercise it.
PLAIN = {"qwen2-sliding": {"use_sliding_window": False}, "mistral": {"sliding_window": None},
         "phi3-longrope": {"rope_scaling": None, "partial_rotary_factor": 1.0}, "llama3": {"rope_scaling": None}}
# Where the compiled decode step applies: Llama-shaped layers without QK-norm, sliding windows or
# partial rotary (a Mistral or Phi-3 without a window is one).
COMPILED = {"qwen2", "phi3", "llama3"}


def _build(kind: str, overrides: dict, seed: int = 0):
    config = getattr(transformers, f"{kind}Config")(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


@functools.cache
def tiny(variant: str):
    kind, overrides = VARIANTS[variant]
    return _build(kind, overrides)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


FAMILIES = sorted(VARIANTS)


@pytest.mark.parametrize("variant", FAMILIES)
def test_off_equals_stock(variant):
    model = tiny(variant)
    engine = Engine(model)
    for n in (1, 37):
        ids = _ids(n, n)
        out = engine(ids)
        assert (out.logits - model(ids[None]).logits[0]).abs().max().item() <= 1e-5
        assert out.ledger.total_flops == dense_forward_flops(arch_spec(model.config), n)["total"]


@pytest.mark.parametrize("variant", sorted(PLAIN))
def test_the_variant_setting_changes_the_stock_model(variant):
    model = tiny(variant)
    kind, overrides = VARIANTS[variant]
    plain = getattr(transformers, f"{kind}ForCausalLM")(
        getattr(transformers, f"{kind}Config")(**{**BASE, **overrides, **PLAIN[variant]})).eval()
    plain.load_state_dict(model.state_dict())
    ids = _ids(37, 0)
    assert (plain(ids[None]).logits - model(ids[None]).logits).abs().max() > 1e-3


@pytest.mark.parametrize("variant", FAMILIES)
def test_greedy_generation_equals_hf_generate(variant):
    model = tiny(variant)
    ids = _ids(10, 3)
    ours = generate(Engine(model), ids, max_new_tokens=14).tokens[0]  # past the window and longrope's switch
    theirs = model.generate(ids[None], max_new_tokens=14, do_sample=False, pad_token_id=0)[0, 10:].tolist()
    assert ours == theirs
    assert len(set(theirs)) > 2  # not a degenerate repetition


def _fit(name: str, n_layers: int) -> Config:
    """Preset ``name`` with its layer indices moved into a 4-layer model and its KV rule binding in 40 tokens."""
    config = Config.preset(name)
    settings = []
    if config.halting.enabled:
        settings += ["halting.min_layer=1", "halting.tail_layers=1", "halting.threshold=2.0", "halting.patience=1",
                     "halting.protect_first=2"]
    if config.amq.enabled and config.amq.adaptive:
        settings += ["amq.decision_layer=1"]
    if config.fusion.enabled:
        settings += ["fusion.layer=1"]
    if config.kv.enabled:
        settings += ["kv.min_keys=0", "kv.recent_window=4", "kv.keep_fraction=0.3"]
        if config.kv.selection == "quest":
            settings += ["kv.block_pages=4", "kv.dense_prefill=false"]
    return config.with_settings(settings) if settings else config


def _engine(model, config):
    calibration = _ids(64, 9) if config.amq.enabled and config.amq.smoothing is not None else None
    return Engine(model, config, calibration_ids=calibration)


@pytest.mark.parametrize("variant", FAMILIES)
def test_every_preset_stays_causal(variant):
    model = tiny(variant)
    a = _ids(40, 1)
    b = a.clone()
    b[18:] = _ids(22, 2)
    for name in sorted(PRESETS):
        engine = _engine(model, _fit(name, 4))
        la, lb = engine(a).logits, engine(b).logits
        # Equal up to float32 rounding: where later tokens halt differently, the earlier rows are
        # gathered into matmuls of a different row count, which round differently (hidden 64).
        torch.testing.assert_close(la[:18], lb[:18], atol=1e-5, rtol=0, msg=name)
        assert (la[18:] - lb[18:]).abs().max() > 1e-2, name


@pytest.mark.parametrize("variant", FAMILIES)
def test_mechanisms_act(variant):
    """Halting halts, AMQ and ``fast`` run below 16 bits, ``kvskip`` reads fewer keys while generating,
    and ``lossless`` generates what ``off`` generates."""
    model = tiny(variant)
    prompt = _ids(24, 4)
    assert _engine(model, _fit("halting", 4))(prompt).ledger.halted_tokens > 0
    for name in ("amq", "fast"):
        assert _engine(model, _fit(name, 4))(prompt).ledger.as_dict()["bits_per_token"] < 16, name
    off = generate(Engine(model), prompt, max_new_tokens=5)
    kvskip = generate(_engine(model, _fit("kvskip", 4)), prompt, max_new_tokens=5)
    assert kvskip.new_tokens == 5 and kvskip.ledger["kv_fraction"] < off.ledger["kv_fraction"]
    assert generate(_engine(model, Config.preset("lossless")), prompt, max_new_tokens=5).tokens == off.tokens


SELECTIONS = ["window", "quest", "knorm", "h2o", "tova", "snapkv"]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_every_kv_rule_keeps_mistrals_window(selection):
    """No query reads a key 6 or more positions back, in a prefill or a decode step; compact == masked."""
    model, W, L = tiny("mistral"), 6, 4
    settings = {"enabled": True, "selection": selection, "recent_window": 3, "sink_tokens": 2, "keep_fraction": 0.5,
                "page_size": 2, "observation": 2}
    engine = Engine(model, Config.from_dict({"kv": settings}))
    ids = _ids(40, 5)
    compact, masked = engine(ids), engine(ids, compact=False)
    assert torch.allclose(compact.logits, masked.logits, atol=1e-5)
    assert compact.ledger.pairs_seen == masked.ledger.pairs_seen
    assert compact.ledger.pairs_seen <= L * sum(min(i + 1, W) for i in range(40))
    caches = new_caches(engine, [48])
    logits, _ = prefill_batch(engine, [ids[:30]], caches)
    for step in range(6):
        logits, ledger = decode_one_token(engine, logits.argmax(-1), caches)
        assert ledger.pairs_seen <= L * W


@pytest.mark.parametrize("variant", FAMILIES)
def test_where_the_compiled_step_applies(variant, monkeypatch):
    """The compiled step's structure key exists exactly for Llama-shaped layers, and its arithmetic
    (run uncompiled: the compiler itself is tested in test_compiled.py) equals the eager step."""
    model = tiny(variant)
    engine = Engine(model)
    assert (compiled.structure(engine) is not None) == (variant in COMPILED)
    if compiled.structure(engine) is None:
        return
    monkeypatch.setenv("QUICKSILVER_COMPILE", "1")
    monkeypatch.setenv("QUICKSILVER_NATIVE_STEP", "0")  # the compiled step, not the native one (test_native_decode.py)
    engine = Engine(model)
    monkeypatch.setattr(compiled, "compiled_step", lambda key, make: make())
    prompts = [_ids(7, 6), _ids(4, 7)]
    results = []
    for use in (False, True):
        caches = new_caches(engine, [16, 16])
        logits, _ = prefill_batch(engine, prompts, caches)
        steps = []
        for _ in range(4):
            logits, _ = decode_one_token(engine, logits.argmax(-1), caches, compile=use)
            steps.append(logits)
        results.append(torch.stack(steps))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)


def test_a_family_without_its_window_is_compiled():
    assert compiled.structure(Engine(_build("Mistral", {"sliding_window": None}))) is not None
    assert compiled.structure(Engine(_build("Phi3", {"sliding_window": 512}))) is not None  # longer than the context: no window
    assert compiled.structure(Engine(_build("Phi3", {"sliding_window": 64}))) is None


@pytest.mark.parametrize("variant", FAMILIES)
def test_native_kernels_serve_every_family_in_bfloat16(variant, monkeypatch):
    """The native dense kernel is a question of weight shape and dtype only: every linear of every
    family (Phi-3's row views of its fused weights included) reaches it where the machine has it."""
    from quicksilver import native

    model = copy.deepcopy(tiny(variant)).to(torch.bfloat16)
    engine = Engine(model)
    layer = engine.adapter.layers[0]
    linears = [layer.qkv, layer.o, layer.gate_up, layer.mlp_linears[2]]
    assert all(isinstance(m, Linear) and m.weight.is_contiguous() for m in linears)
    if not native.available():
        pytest.skip(f"no native kernels here: {native.why_not()}")
    assert all(kernels.dense_candidates(m.weight, torch.bfloat16) == ["torch", "native16"] for m in linears)
    calls = []
    monkeypatch.setattr(kernels, "_native16", lambda x, w, b=None: calls.append(w.shape) or torch.nn.functional.linear(x, w, b))
    monkeypatch.setattr(kernels.KernelTable, "choose_dense", lambda self, w, rows, dtype: "native16")
    engine(_ids(5, 8))
    assert len(calls) == 4 * len(engine.adapter.layers) + 1  # and the LM head
