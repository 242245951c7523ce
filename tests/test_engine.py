"""The engine's promises: identity when off, compact == masked reference, causality, extremes."""

from pathlib import Path

import pytest
import torch

from conftest import TINY
from quicksilver.decoding import generate
from quicksilver.adapters import arch_spec
from quicksilver.config import PRESETS, Config
from quicksilver.engine import Engine
from quicksilver.errors import QuicksilverError
from quicksilver.flops import dense_forward_flops

# Aggressive settings so that tiny random models really halt and skip.
AGGRESSIVE = {
    "halt-layer": {"halting": {"enabled": True, "threshold": 0.6, "min_layer": 1, "patience": 1, "tail_layers": 1, "protect_first": 2}},
    "halt-mlp": {"halting": {"enabled": True, "threshold": 0.6, "min_layer": 1, "patience": 1, "tail_layers": 1, "protect_first": 2, "skip": "mlp"}},
    "halt-cosine-skipkv": {
        "halting": {"enabled": True, "signal": "cosine", "threshold": 0.2, "min_layer": 1, "patience": 1, "tail_layers": 1, "protect_first": 1},
        "kv": {"enabled": True, "policy": "skip"},
    },
    "window": {"kv": {"enabled": True, "recent_window": 5, "sink_tokens": 2}},
    "window-late": {"kv": {"enabled": True, "recent_window": 3, "sink_tokens": 0, "layers_from": 2}},
    "halt+window+skipkv": {
        "halting": {"enabled": True, "threshold": 0.6, "min_layer": 1, "patience": 1, "tail_layers": 1, "protect_first": 2},
        "kv": {"enabled": True, "policy": "skip", "recent_window": 6, "sink_tokens": 1},
    },
}


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("seq_len", [1, 2, 37])
def test_off_equals_stock_model(family, seq_len):
    model = TINY[family]()
    ids = torch.randint(0, 99, (seq_len,))
    ref = model(ids[None]).logits[0]
    out = Engine(model)(ids)
    assert (out.logits - ref).abs().max().item() <= 1e-5
    assert out.ledger.total_flops == dense_forward_flops(arch_spec(model.config), seq_len)["total"]


def test_off_equals_stock_model_on_a_batch_and_logit_rows():
    model = TINY["llama"]()
    ids = torch.randint(0, 99, (3, 20))
    rows = torch.tensor([4, 5, 19])
    out = Engine(model)(ids, rows)
    assert out.logits.shape == (3, 3, 99)
    assert torch.allclose(out.logits, model(ids).logits[:, rows], atol=1e-5)


@pytest.mark.real_model
def test_off_equals_stock_default_model(default_model):
    model, _ = default_model
    ids = torch.randint(0, model.config.vocab_size, (96,), generator=torch.Generator().manual_seed(0))
    ref = model(ids[None]).logits[0]
    assert (Engine(model)(ids).logits - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("name", sorted(AGGRESSIVE))
def test_compact_path_equals_masked_reference(family, name):
    model = TINY[family](seed=3)
    engine = Engine(model, Config.from_dict(AGGRESSIVE[name]))
    ids = torch.randint(0, 99, (41,), generator=torch.Generator().manual_seed(5))
    compact, masked = engine(ids), engine(ids, compact=False)
    assert torch.allclose(compact.logits, masked.logits, atol=1e-5)
    assert compact.ledger.as_dict() == masked.ledger.as_dict()
    stats = compact.ledger.as_dict()
    # The pattern is not trivial: something was really skipped.
    assert stats["flops"]["total"] < dense_forward_flops(arch_spec(model.config), 41)["total"]


def _causality(engine, vocab, seq_len=40, t=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, vocab, (seq_len,), generator=g)
    b = a.clone()
    b[t + 1 :] = torch.randint(0, vocab, (seq_len - t - 1,), generator=g)
    la, lb = engine(a).logits, engine(b).logits
    assert torch.equal(la[: t + 1], lb[: t + 1])
    assert not torch.equal(la[t + 1 :], lb[t + 1 :])


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("name", sorted(AGGRESSIVE))
def test_aggressive_settings_are_causal(family, name):
    _causality(Engine(TINY[family](), Config.from_dict(AGGRESSIVE[name])), 99)


@pytest.mark.real_model
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_causal_on_the_default_model(default_model, preset_engine, preset):
    _causality(preset_engine(preset), default_model.model.config.vocab_size, seq_len=96, t=60)


CALIBRATED = sorted((Path(__file__).resolve().parent.parent / "docs" / "results" / "calibrated").glob("*.json"))


@pytest.mark.real_model
@pytest.mark.parametrize("path", CALIBRATED, ids=[p.stem for p in CALIBRATED])
def test_committed_calibrated_configs_load_and_are_causal(default_model, path):
    from quicksilver.evaluate import make_engine

    model, tok = default_model
    config = Config.load(path)
    assert config.calibration["test_splits"]["wiki"]["within_budget"] in (True, False)
    # Short windows so the recent window binds inside the test sequence, as it does at 4,096 tokens.
    config.kv.recent_window = min(config.kv.recent_window or 48, 48)
    _causality(make_engine(model, tok, config), model.config.vocab_size, seq_len=96, t=60)


def test_zero_threshold_never_halts_and_equals_off():
    model = TINY["llama"]()
    ids = torch.randint(0, 99, (30,))
    cfg = Config.from_dict({"halting": {"enabled": True, "threshold": 0.0, "min_layer": 1, "tail_layers": 1}})
    out = Engine(model, cfg)(ids)
    assert torch.equal(out.logits, Engine(model)(ids).logits)
    assert out.ledger.as_dict()["mean_exit_layer"] == 4


def test_huge_threshold_halts_every_unprotected_token_at_min_layer():
    model = TINY["gpt2"]()
    ids = torch.randint(0, 99, (30,))
    cfg = Config.from_dict({"halting": {"enabled": True, "threshold": 2.0, "min_layer": 2, "patience": 1, "tail_layers": 1, "protect_first": 3}})
    stats = Engine(model, cfg)(ids).ledger.as_dict()
    assert stats["halted_fraction"] == pytest.approx(27 / 30)
    assert stats["mean_exit_layer"] == pytest.approx((27 * 2 + 3 * 4) / 30)
    # computed token-layers: 30 tokens x 2 layers, protected 3 x 1 more, everyone in the tail layer
    assert stats["mlp_layer_fraction"] == pytest.approx((30 * 2 + 3 + 30) / (30 * 4))


def test_window_longer_than_the_sequence_equals_off():
    model = TINY["llama"]()
    ids = torch.randint(0, 99, (25,))
    out = Engine(model, Config.from_dict({"kv": {"enabled": True, "recent_window": 25}}))(ids)
    assert torch.allclose(out.logits, Engine(model)(ids).logits, atol=1e-6)
    assert out.ledger.as_dict()["kv_fraction"] == 1.0


def test_a_window_that_never_binds_takes_the_plain_causal_path(monkeypatch):
    import quicksilver.engine as engine_module

    def no_plan(*args, **kwargs):
        raise AssertionError("block plan built for a window that skips nothing")

    monkeypatch.setattr(engine_module, "block_plan", no_plan)
    model = TINY["llama"]()
    ids = torch.randint(0, 99, (25,))
    engine = Engine(model, Config.from_dict({"kv": {"enabled": True, "recent_window": 25}}))
    assert torch.allclose(engine(ids).logits, Engine(model)(ids).logits, atol=1e-6)
    result = generate(engine, ids[:20], 5)  # decode steps: every cached key still inside the window
    assert result.new_tokens == 5


def test_window_counts_exactly_the_visible_pairs():
    model = TINY["llama"]()
    T, W, S = 30, 4, 2
    out = Engine(model, Config.from_dict({"kv": {"enabled": True, "recent_window": W, "sink_tokens": S}}))(torch.randint(0, 99, (T,)))
    per_query = [min(i + 1, W + min(S, max(i + 1 - W, 0))) for i in range(T)]
    assert out.ledger.pairs_seen == 4 * sum(per_query)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"halting": {"threshold": -0.1}}, "threshold"),
        ({"halting": {"signal": "norm"}}, "signal"),
        ({"halting": {"patience": 0}}, "patience"),
        ({"halting": {"skip": "attention"}}, "skip"),
        ({"kv": {"policy": "zero"}}, "policy"),
        ({"kv": {"recent_window": 0}}, "recent_window"),
        ({"kv": {"sink_tokens": 1.5}}, "sink_tokens"),
        ({"halting": {"bogus": 1}}, "unknown halting setting"),
        ({"fusion2": {}}, "unknown config section"),
        ({"kv": 5}, "must be a JSON object"),
        ({"calibration": [1]}, "calibration entry"),
    ],
)
def test_invalid_settings_are_rejected(data, message):
    with pytest.raises(QuicksilverError, match=message):
        Config.from_dict(data)


def test_settings_that_do_not_fit_the_model_are_rejected():
    model = TINY["llama"]()  # 4 layers
    with pytest.raises(QuicksilverError, match="tail_layers"):
        Engine(model, Config.from_dict({"halting": {"enabled": True, "tail_layers": 4, "min_layer": 1}}))
    with pytest.raises(QuicksilverError, match="min_layer"):
        Engine(model, Config.from_dict({"halting": {"enabled": True, "tail_layers": 1, "min_layer": 4}}))


def test_set_assignments_parse_by_type_and_enable_the_mechanism():
    cfg = Config.preset("off").with_settings(["halting.threshold=0.3", "halting.skip=mlp", "kv.recent_window=none"])
    assert cfg.halting.enabled and cfg.halting.threshold == 0.3 and cfg.halting.skip == "mlp"
    assert cfg.kv.enabled and cfg.kv.recent_window is None
    assert not Config.preset("halting").with_settings(["halting.enabled=false"]).halting.enabled
    for bad in (["threshold=0.3"], ["halting.nope=1"], ["halting.patience=two"]):
        with pytest.raises(QuicksilverError):
            Config.preset("off").with_settings(bad)


def test_config_round_trips_through_a_file(tmp_path):
    cfg = Config.preset("kvskip")
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(QuicksilverError, match="not valid JSON"):
        Config.load(tmp_path / "bad.json")


@pytest.mark.parametrize("bad,message", [([1.5, 2.0], "token ids"), (torch.tensor([[0.5]]), "token ids"), ("hello", "token ids"),
                                         (torch.tensor([], dtype=torch.long), "non-empty"), (torch.zeros(1, 2, 3, dtype=torch.long), "non-empty"),
                                         (torch.tensor([5, 10**6]), "vocabulary"), (torch.tensor([-1]), "vocabulary")])
def test_bad_input_ids_get_one_clear_error(bad, message):
    engine = Engine(TINY["llama"](seed=0))
    with pytest.raises(QuicksilverError, match=message):
        engine(bad)
    assert torch.equal(engine([1, 2, 3]).logits, engine(torch.tensor([1, 2, 3])).logits)  # a list of ints is fine


def test_load_model_refuses_a_name_that_is_not_text():
    from quicksilver import load_model

    with pytest.raises(QuicksilverError, match="offline name"):
        load_model(123)
