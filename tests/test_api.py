"""An API without traps and labels that do not lie: preset names wherever a Config goes, honest
names after changes, each preset's promise and reach, one-line errors, a quiet command line."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch

import quicksilver
from quicksilver import Config, Engine, QuicksilverError, evaluate_model, window_plan
from quicksilver.adapters import arch_spec
from quicksilver.config import PRESET_INFO, PRESETS
from quicksilver.flops import dense_forward_flops

from conftest import tiny_llama


def test_mechanism_dataclasses_are_exported_from_the_package():
    from quicksilver import AdaptiveMatryoshkaQuantization, ContextualTokenFusion, DynamicTokenHalting, KVCacheSkipping

    cfg = Config(halting=DynamicTokenHalting(enabled=True), kv=KVCacheSkipping(), fusion=ContextualTokenFusion(),
                 amq=AdaptiveMatryoshkaQuantization())
    assert cfg.halting.enabled and set(quicksilver.__all__) >= {"DynamicTokenHalting", "PresetInfo"}


@pytest.mark.parametrize(
    "start,settings,name",
    [
        ("off", ["halting.threshold=0.13"], "custom"),
        ("kvskip", ["kv.keep_fraction=0.5"], "kvskip+custom"),
        ("kvskip", ["kv.keep_fraction=0.25"], "kvskip"),  # the preset's own value: still the preset
        ("all", ["amq.enabled=false"], "all+custom"),
    ],
)
def test_changed_settings_are_labelled_custom(start, settings, name):
    assert Config.preset(start).with_settings(settings).name == name


def test_saved_and_loaded_configs_keep_honest_names(tmp_path):
    path = tmp_path / "c.json"
    Config.preset("off").with_settings(["halting.threshold=0.13"]).save(path)
    assert Config.load(path).name == "custom"
    # A file that claims a preset's name for other settings is relabelled when loaded.
    assert Config.from_dict({"name": "off", "halting": {"enabled": True}}).name == "custom"
    assert Config.from_dict({**Config.preset("amq").to_dict()}).name == "amq"
    calibrated = Config.from_dict({"name": "calibrated 1% (flops)", "kv": {"enabled": True, "recent_window": 512}})
    assert calibrated.name == "calibrated 1% (flops)"
    assert calibrated.with_settings(["kv.recent_window=256"]).name == "calibrated 1% (flops)+custom"


def test_cli_labels_a_set_only_run_custom():
    from quicksilver.cli import _config

    assert _config("off", None, ["halting.threshold=0.13"]).name == "custom"
    assert _config("kvskip", None, []).name == "kvskip"


def test_every_preset_states_a_promise_and_baselines_promise_nothing():
    assert set(PRESET_INFO) == set(PRESETS)
    for name in PRESETS:
        info = Config.preset(name).promise
        assert info is PRESET_INFO[name] and info.summary
        assert info.baseline == (name in ("int8", "int4"))
        for section in info.acts_from:
            assert getattr(Config.preset(name), section).enabled, f"{name}: acts_from names {section}, which it leaves off"
    assert Config.preset("off").with_settings(["kv.recent_window=8"]).promise is None
    assert PRESET_INFO["all"].idle_at(512) == ["kv", "halting"]


def test_all_kv_reach_is_where_the_engine_first_drops_a_key():
    """``acts_from`` for ``all``'s window is sinks + window + 1: one token shorter, every pair is kept; at it, one is not.

    Checked with the preset's rule at a 16-key window (the same code path, far cheaper than 2,048).
    """
    kv = Config.preset("all").kv
    assert PRESET_INFO["all"].acts_from["kv"] == kv.sink_tokens + kv.recent_window + 1
    engine = Engine(tiny_llama(), Config.preset("off").with_settings(["kv.enabled=true", "kv.recent_window=16"]))
    reach = kv.sink_tokens + 16 + 1
    ids = torch.randint(0, 99, (reach,))
    assert engine(ids[: reach - 1], torch.tensor([0])).ledger.as_dict()["kv_fraction"] == 1.0
    assert engine(ids, torch.tensor([0])).ledger.as_dict()["kv_fraction"] < 1.0


def test_kvskip_acts_in_generation_from_its_reach_and_never_teacher_forced():
    """``kvskip``: a teacher-forced pass is the stock model; a decode step reads fewer keys than its past from
    ``acts_from`` on (checked at a 40-key floor, the same code path as 1,024)."""
    from quicksilver.cache import SequenceCache
    from quicksilver.decoding import decode_one_token, prefill

    kv = Config.preset("kvskip").kv
    assert PRESET_INFO["kvskip"].acts_from["kv"] == kv.reach() == kv.min_keys + 2 and PRESET_INFO["kvskip"].generation_only == ("kv",)
    model = tiny_llama()
    engine = Engine(model, Config.preset("kvskip").with_settings(["kv.min_keys=40", "kv.recent_window=4"]))
    ids = torch.randint(0, 99, (50,))
    assert torch.equal(engine(ids).logits, Engine(model)(ids).logits)
    for n, every_key in ((41, True), (42, False)):  # the decode query at position n - 1 after n - 1 prompt tokens
        cache = SequenceCache(model.config.num_hidden_layers)
        prefill(engine, ids[: n - 1], cache)
        _, ledger = decode_one_token(engine, ids[n - 1 : n], [cache])
        assert (ledger.as_dict()["kv_fraction"] == 1.0) == every_key


def test_engine_and_evaluate_take_preset_names():
    engine = Engine(tiny_llama(), "kvskip")
    assert engine.config.name == "kvskip" and engine.config.kv.enabled
    with pytest.raises(QuicksilverError, match="unknown preset 'nope'"):
        evaluate_model(config="nope")  # rejected before anything loads
    with pytest.raises(QuicksilverError, match="config must be a Config or a preset name"):
        Engine(tiny_llama(), 42)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: evaluate_model(window="abc"), "window must be an integer"),
        (lambda: evaluate_model(max_tokens=0), "max-tokens must be at least 1, got 0"),
        (lambda: evaluate_model(model=tiny_llama()), "model must be a name"),
        (lambda: window_plan(10.5, 4, 3, False), "n_tokens must be an integer"),
        (lambda: dense_forward_flops(arch_spec(tiny_llama().config), 0), "seq_len must be at least 1"),
        (lambda: dense_forward_flops(None, 5), "spec must be an ArchSpec"),
        (lambda: Engine("smollm2-135m"), "needs a loaded HF model"),
        (lambda: Config().with_settings("halting.threshold=0.1"), "expects a list"),
        (lambda: quicksilver.load_corpus(text_file=".."), "is a folder"),
    ],
)
def test_public_functions_reject_bad_arguments_in_one_line(call, message):
    with pytest.raises(QuicksilverError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_cli_notes_when_the_context_is_too_short_for_the_preset(capsys):
    from quicksilver.cli import _reach_note

    _reach_note(Config.preset("kvskip"), 512)
    _reach_note(Config.preset("all"), 2560)
    _reach_note(Config.preset("kvskip"), 4096)  # long enough: silent
    _reach_note(Config.preset("kvskip"), 4096, teacher_forced=True)  # but a teacher-forced pass is the stock model
    _reach_note(Config.preset("off").with_settings(["kv.recent_window=8"]), 4)  # custom: no promise, no note
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert "preset kvskip does nothing (kv acts from 1,026 tokens)" in lines[0] and "stock model" in lines[0]
    assert "part of preset all does nothing (halting acts from 3,072 tokens)" in lines[1]
    assert "preset kvskip does nothing (kv acts only in generation)" in lines[2]


def run_cli(monkeypatch, capsys, *args):
    from quicksilver import cli

    monkeypatch.setattr(sys, "argv", ["quicksilver", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message,absent",
    [
        (["generate", "hi", "--preset", "fusion"], "Contextual Token Fusion works in eval only: fused tokens write no K/V", None),
        (["generate", "hi", "--set", "fusion.enabled=true"], "works in eval only", None),
        (["eval", "--text-file", "."], "is a folder", "does not exist"),
        (["calibrate", "--budget", "1%", "--heldout", "foo"], "unknown corpus 'foo'", "--text-file"),
    ],
)
def test_cli_wording(monkeypatch, capsys, args, message, absent):
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert absent is None or absent not in err


def test_third_party_noise_is_silenced_at_the_command_line_only(monkeypatch, capsys):
    from quicksilver import cli

    calls = []
    monkeypatch.setattr(cli, "quiet_third_party", lambda: calls.append(1))
    monkeypatch.setenv("QUICKSILVER_DEBUG", "1")
    assert run_cli(monkeypatch, capsys, "--help")[0] == 0 and calls == []  # debug: everything shows
    monkeypatch.delenv("QUICKSILVER_DEBUG")
    assert run_cli(monkeypatch, capsys, "--help")[0] == 0 and calls == [1]
    monkeypatch.undo()

    names = ("torchao", "torch", "lm_eval", "ray", "datasets")
    levels = {n: logging.getLogger(n).level for n in names}
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    for var in ("TORCH_LOGS", "TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):
        monkeypatch.setenv(var, "")  # restored afterwards: quiet_third_party only sets what is unset
        monkeypatch.delenv(var)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli.quiet_third_party()
            logging.getLogger("torchao.kernel.intmm").warning("Warning: Detected no triton")
            logging.getLogger("torch.utils._pytree").warning("is an Enum subclass")
            warnings.warn_explicit("lm-eval says hello", UserWarning, "lm_eval/__init__.py", 1, module="lm_eval.api")
            warnings.warn_explicit("ours", UserWarning, "quicksilver/x.py", 1, module="quicksilver.x")
    finally:
        logging.getLogger().removeHandler(handler)
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
    err = capsys.readouterr().err
    assert "triton" not in err and "Enum" not in err
    assert [str(w.message) for w in caught] == ["ours"]  # only known third parties are silenced
