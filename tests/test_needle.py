"""Needle and continuation perplexity: same trials for every config, kept fraction measured, clear errors."""

import json

import pytest
import torch

from quicksilver.config import Config
from quicksilver.engine import Engine
from quicksilver.needle import answer_key, make_trials, parse_depths, run_trial
from test_cli import run_cli


@pytest.mark.parametrize("args,message", [(["--depths", "0.5,2"], "--depths"), (["--depths", "a"], "--depths"),
                                          (["--trials", "0"], "trials"), (["--output", "/no/such/dir/r.json"], "does not exist")])
def test_needle_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "needle", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_answer_key_and_depths():
    assert answer_key(" 12345. Remember") == "12345"
    assert answer_key(" a key") == ""
    assert parse_depths("0,0.5, 1") == (0.0, 0.5, 1.0)


@pytest.mark.real_model
def test_trials_are_reproducible_and_hold_the_needle(default_model):
    _, tok = default_model
    hay = torch.arange(1000, 3000)
    a = make_trials(tok, hay, [200, 300], (0.2, 0.8), 3, seed=1)
    b = make_trials(tok, hay, [200, 300], (0.2, 0.8), 3, seed=1)
    assert [t.key for t in a] == [t.key for t in b] and all(torch.equal(x.ids, y.ids) for x, y in zip(a, b))
    assert [t.ids.numel() for t in a] == [200] * 3 + [300] * 3
    assert all(t.key in tok.decode(t.ids) for t in a)


@pytest.mark.real_model
def test_kept_fraction_is_measured_from_what_the_question_reads(default_model):
    model, tok = default_model
    trial = make_trials(tok, torch.arange(1000, 3000), [256], (0.5,), 1)[0]
    _, full = run_trial(Engine(model), trial, answer_tokens=2)
    assert full == pytest.approx(1.0)
    engine = Engine(model, Config.from_dict({"kv": {"enabled": True, "selection": "snapkv", "keep_fraction": 0.25, "recent_window": 16}}))
    _, kept = run_trial(engine, trial, answer_tokens=2)
    assert kept == pytest.approx(0.25, abs=0.01)
    assert engine.config.kv.enabled  # restored after the question ran in full


@pytest.mark.real_model
def test_continuation_cli_writes_json(monkeypatch, capsys, tmp_path, default_model):
    out = tmp_path / "c.json"
    code, _, _ = run_cli(monkeypatch, capsys, "continuation", "--prefix-tokens", "96", "--continuation-tokens", "16", "--max-chunks", "1",
                         "--set", "kv.selection=knorm", "--set", "kv.keep_fraction=0.5", "--set", "kv.recent_window=8", "--set", "kv.min_keys=0", "-o", str(out))
    assert code == 0
    r = json.loads(out.read_text())
    assert r["chunks"] == 1 and r["tokens"] == 16 and 0.4 < r["kv_fraction"] < 0.6
    assert r["perplexity"] != r["baseline_perplexity"]
