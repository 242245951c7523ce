"""The lm-eval model `quicksilver`: off equals lm-eval's own `hf` model on local tasks; presets change it."""

from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import quicksilver  # noqa: E402,F401  (registers the lm-eval model)
from tiny_folder import save_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["qs_rolling", "qs_choice"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with the default model's tokenizer, saved as a model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-lm-eval"))


def _samples(result, task):
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_off_equals_lm_eval_hf_model(tiny_folder, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root
    tm = TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks"), include_defaults=False)
    # max_length 64 makes each text span several rolling windows.
    args = f"pretrained={tiny_folder},dtype=float32,max_length=64"
    common = dict(tasks=TASKS, task_manager=tm, batch_size=4, log_samples=True, device="cpu")
    ours = lm_eval.simple_evaluate(model="quicksilver", model_args=args + ",preset=off", **common)
    ref = lm_eval.simple_evaluate(model="hf", model_args=args, **common)
    for task in TASKS:
        a, b = _samples(ours, task), _samples(ref, task)
        assert len(a) == len(b) > 0
        flat_a = torch.tensor([float(x[0] if task == "qs_rolling" else x[0][0]) for doc in a for x in doc])
        flat_b = torch.tensor([float(x[0] if task == "qs_rolling" else x[0][0]) for doc in b for x in doc])
        assert torch.allclose(flat_a, flat_b, atol=1e-4, rtol=0)
    for key in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["qs_rolling"][key] == pytest.approx(ref["results"]["qs_rolling"][key], rel=1e-4)
    assert ours["results"]["qs_choice"]["acc_norm,none"] == ref["results"]["qs_choice"]["acc_norm,none"]
    assert ours["config"]["quicksilver_ledger"]["tokens"] > 0  # the engine ran the requests


def test_settings_generation_and_presets(tiny_folder):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    cls = get_model("quicksilver")
    lm = cls.create_from_arg_string(f"pretrained={tiny_folder},max_length=64", {"batch_size": 2})
    windowed = cls.create_from_arg_string(
        f"pretrained={tiny_folder},max_length=64,set=kv.recent_window=4,kv.sink_tokens=1", {"batch_size": 2}
    )
    assert windowed.qs_config.kv.enabled and windowed.qs_config.kv.recent_window == 4 and windowed.qs_config.kv.sink_tokens == 1
    text = (ROOT / "tests" / "lm_eval_tasks" / "data" / "rolling.jsonl").read_text().splitlines()[0]
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    off, win = lm.loglikelihood_rolling(rolling)[0], windowed.loglikelihood_rolling(rolling)[0]
    assert off != pytest.approx(win, abs=1e-3)  # a 4-token window really changes the scores

    hf = HFLM(pretrained=lm._model, tokenizer=lm.tokenizer, max_length=64, batch_size=1)
    gen = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), i)
           for i, p in enumerate(["The river rises", "Bees communicate the direction of"])]
    assert lm.generate_until(gen) == hf.generate_until(gen)


def test_bad_model_arg_is_a_clear_error(tiny_folder):
    from lm_eval.api.registry import get_model

    from quicksilver.errors import QuicksilverError

    with pytest.raises(QuicksilverError, match="unknown quicksilver model arg"):
        get_model("quicksilver").create_from_arg_string(f"pretrained={tiny_folder},threshold=0.1")
