"""Generation: off equals HF generate; cached decoding equals recomputation; batches equal rows alone."""

import pytest
import torch

from conftest import TINY
from quicksilver.decoding import generate
from quicksilver.config import PRESETS, Config
from quicksilver.engine import Engine
from quicksilver.errors import QuicksilverError
from test_engine import AGGRESSIVE


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("prompt_len", [1, 9])
def test_off_greedy_equals_hf_generate(family, prompt_len):
    model = TINY[family]()
    prompt = torch.randint(0, 99, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    hf = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, prompt_len:].tolist()
    assert generate(Engine(model), prompt[0], 16).tokens[0] == hf


@pytest.mark.real_model
def test_off_greedy_equals_hf_generate_on_the_default_model(default_model):
    model, tok = default_model
    prompt = tok("The history of the Roman Empire", return_tensors="pt").input_ids
    hf = model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)[0, prompt.shape[1]:].tolist()
    assert generate(Engine(model), prompt[0], 32).tokens[0][: len(hf)] == hf


def _recompute_greedy(engine, prompt, steps):
    seq = prompt.clone()
    out = []
    for _ in range(steps):
        tok = int(engine(seq).logits[-1].argmax())
        out.append(tok)
        seq = torch.cat([seq, torch.tensor([tok])])
    return out


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("name", sorted(AGGRESSIVE))
def test_cached_decoding_equals_recomputing_the_prefix(family, name):
    engine = Engine(TINY[family](seed=1), Config.from_dict(AGGRESSIVE[name]))
    prompt = torch.randint(0, 99, (11,), generator=torch.Generator().manual_seed(2))
    assert generate(engine, prompt, 10).tokens[0] == _recompute_greedy(engine, prompt, 10)


@pytest.mark.real_model
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_decode_like_recomputation_on_the_default_model(default_model, preset_engine, preset):
    """Teacher-forced: every generated token is the full forward's argmax at that step, except
    at a numerical near-tie (a 1-row and a T-row matmul differ by ~1e-6 in float32, which
    quantized activations can round apart)."""
    from quicksilver.evaluate import make_engine

    model, tok = default_model
    config = Config.preset(preset)
    engine = preset_engine(preset)
    # Fusion is prefill-only and generate runs without it: recompute without it too.
    reference = make_engine(model, tok, config.with_settings(["fusion.enabled=false"])) if config.fusion.enabled else engine
    prompt = tok("Photosynthesis is the process by which", return_tensors="pt").input_ids[0]
    generated = generate(engine, prompt, 12).tokens[0]
    full = reference(torch.cat([prompt, torch.tensor(generated)])).logits[prompt.numel() - 1 : -1]
    top2 = full.topk(2, dim=-1).values
    for step, token in enumerate(generated):
        near_tie = float(top2[step, 0] - top2[step, 1]) < 0.05
        assert token == int(full[step].argmax()) or near_tie, f"step {step}"


@pytest.mark.parametrize("name", ["halt+window+skipkv", "halt-mlp"])
def test_a_batch_equals_its_rows_alone(name):
    engine = Engine(TINY["llama"](seed=4), Config.from_dict(AGGRESSIVE[name]))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 99, (n,), generator=g) for n in (3, 12, 7)]
    batch = generate(engine, prompts, 9).tokens
    assert batch == [generate(engine, p, 9).tokens[0] for p in prompts]


def test_skipping_and_windows_shrink_the_cache():
    model = TINY["gpt2"]()
    prompt = torch.randint(0, 99, (30,))
    full = generate(Engine(model), prompt, 10)
    assert full.kv_bytes == full.kv_full_bytes
    windowed = generate(Engine(model, Config.from_dict({"kv": {"enabled": True, "recent_window": 8, "sink_tokens": 2}})), prompt, 10)
    # 2 sinks + 8 recent entries per layer at most, for 4 layers, K and V, 32 floats each
    assert windowed.kv_bytes <= 4 * (2 + 8) * 2 * 32 * 4 < full.kv_bytes
    skipped = generate(Engine(model, Config.from_dict(AGGRESSIVE["halt-cosine-skipkv"])), prompt, 10)
    assert skipped.kv_bytes < full.kv_bytes


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    engine = Engine(TINY["llama"]())
    prompt = torch.randint(0, 99, (5,))
    a = generate(engine, prompt, 12, temperature=1.0, seed=7).tokens
    assert a == generate(engine, prompt, 12, temperature=1.0, seed=7).tokens
    assert a != generate(engine, prompt, 12, temperature=1.0, seed=8).tokens
    assert generate(engine, prompt, 12, temperature=0.7, top_k=1).tokens == generate(engine, prompt, 12).tokens
    assert len(generate(engine, prompt, 12, temperature=1.0, top_p=0.5, seed=1).tokens[0]) == 12


def test_eos_stops_a_row():
    engine = Engine(TINY["llama"]())
    prompt = torch.randint(0, 99, (5,))
    free = generate(engine, prompt, 12).tokens[0]
    stopped = generate(engine, prompt, 12, eos_token_id=free[3])
    assert stopped.tokens[0] == free[: free.index(free[3]) + 1]
    assert stopped.stop_reasons == ["eos"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompts": torch.tensor([], dtype=torch.long)}, "empty prompt"),
        ({"max_new_tokens": 0}, "max-new-tokens"),
        ({"prompts": torch.zeros(250, dtype=torch.long), "max_new_tokens": 10}, "context"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5, "temperature": 1.0}, "top-p"),
        ({"stop_strings": ["x"]}, "tokenizer"),
        ({"prompts": [[1.5, 2.0]]}, "integers"),
        ({"prompts": torch.tensor([3, 10**6])}, "vocabulary"),
        ({"prompts": "hello"}, "token ids"),
    ],
)
def test_bad_generation_input(kwargs, message):
    engine = Engine(TINY["llama"]())
    args = {"prompts": torch.tensor([1, 2, 3]), "max_new_tokens": 4, **kwargs}
    with pytest.raises(QuicksilverError, match=message):
        generate(engine, args.pop("prompts"), args.pop("max_new_tokens"), **args)
