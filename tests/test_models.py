import json
import time

import pytest
import torch

from quicksilver import models
from quicksilver.errors import QuicksilverError
from quicksilver.models import load_model, parse_device, parse_dtype


def test_parse_dtype_and_device():
    assert parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(QuicksilverError, match="unknown dtype"):
        parse_dtype("int4")
    with pytest.raises(QuicksilverError, match="unknown device"):
        parse_device("tpu9")


@pytest.mark.parametrize("name,message", [("no-such-model", "unknown model"), ("openai-community/gpt2", "hub")])
def test_unknown_or_unreachable_models_give_clear_errors(name, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QuicksilverError, match=message) as e:
        load_model(name)
    assert "smollm2-135m" in str(e.value)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(QuicksilverError, match="not a model folder"):
        load_model(str(tmp_path))


def test_local_folder_loads_a_saved_tiny_model(tmp_path):
    from conftest import tiny_gpt2
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tmodels

    m = tiny_gpt2()
    m.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tmodels.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), dtype="float32")
    ids = torch.randint(0, 99, (1, 9))
    assert torch.equal(loaded(ids).logits, m(ids).logits)


@pytest.mark.real_model
def test_default_model_cache_is_fast_and_damage_is_detected(default_model):
    folder = models.offline_model_folder("smollm2-135m")
    assert models._cache_is_valid(folder)
    t0 = time.perf_counter()
    load_model("smollm2-135m")
    assert time.perf_counter() - t0 < 10  # generous on a shared machine; ~0.6 s measured
    # A damaged copy (truncated weights) and a partial copy (no manifest) are both refused.
    import shutil

    damaged = folder.parent / "damaged-test-copy"
    shutil.rmtree(damaged, ignore_errors=True)
    damaged.mkdir()
    try:
        manifest = json.loads((folder / models.MANIFEST).read_text())
        (damaged / models.MANIFEST).write_text(json.dumps(manifest))
        for name in manifest["files"]:
            if name != "model.safetensors":
                shutil.copy(folder / name, damaged / name)
        (damaged / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
        assert not models._cache_is_valid(damaged)
        (damaged / models.MANIFEST).unlink()
        assert not models._cache_is_valid(damaged)
    finally:
        shutil.rmtree(damaged, ignore_errors=True)


@pytest.mark.real_model
def test_default_model_perplexity_is_in_range(default_model):
    from quicksilver.evaluate import evaluate_model

    r = evaluate_model("smollm2-135m", "wiki", max_tokens=1024, loaded=default_model)
    assert 15 < r["perplexity"] < 40
    assert r["tokens"] == 1023
    assert r["bits_per_byte"] > 0 and r["word_perplexity"] > r["perplexity"]
