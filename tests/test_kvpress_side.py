"""benchmarks/kvpress_side.py without its kvpress venv: merging partial runs and drawing the table."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("kvpress_side", Path(__file__).resolve().parent.parent / "benchmarks" / "kvpress_side.py")
kvpress_side = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kvpress_side)


def part(method, trials, context="2048", cont=None, **meta):
    rows = {str(i): {"key": key, "depth": 0.1, "answer": f" {got}", "correct": got == key, "kept": 0.25} for i, (key, got) in trials.items()}
    out = {"meta": {"corpus": "wiki", "seed": 0, "commands": [f"run {method}"], **meta}, "needle": {context: {method: rows}}, "continuation": {}}
    if cont:
        out["continuation"] = cont
    return out


def test_merge_keeps_both_runs_and_the_table_compares_shared_trials_only():
    a = part("kvpress:snapkv@0.25", {0: ("11111", "11111"), 1: ("22222", "0")})
    b = part("quicksilver:snapkv@0.25", {0: ("11111", "11111"), 1: ("22222", "22222"), 2: ("33333", "33333")})
    a["versions"], b["versions"] = {"kvpress": "0.5.5"}, {"torch": "2.13"}
    merged = kvpress_side.merge(a, b)
    assert merged["versions"] == {"kvpress": "0.5.5", "torch": "2.13"}
    assert set(merged["needle"]["2048"]) == {"kvpress:snapkv@0.25", "quicksilver:snapkv@0.25"}
    assert merged["meta"]["commands"] == ["run kvpress:snapkv@0.25", "run quicksilver:snapkv@0.25"]
    rows = {r["method"]: r for r in kvpress_side.table_rows(merged)}
    # trial 2 ran on one side only: left out of both cells
    assert rows["kvpress:snapkv@0.25"]["needle"]["2048"] == (1, 2)
    assert rows["quicksilver:snapkv@0.25"]["needle"]["2048"] == (2, 2)
    text = kvpress_side.render_markdown(merged)
    assert "| 25% | kvpress snapkv | 1/2 |" in text and "| 25% | quicksilver snapkv | 2/2 |" in text
    assert "| 25% | needle 2,048 | 1 (snapkv) | 2 (snapkv) | as good or better |" in text


def test_merge_refuses_other_trials_or_settings():
    a = part("kvpress:knorm@0.5", {0: ("11111", "11111")})
    with pytest.raises(kvpress_side.BenchError, match="trials differ"):
        kvpress_side.merge(a, part("quicksilver:knorm@0.5", {0: ("99999", "99999")}))
    with pytest.raises(kvpress_side.BenchError, match="seed"):
        kvpress_side.merge(a, part("quicksilver:knorm@0.5", {0: ("11111", "11111")}, seed=1))


def test_continuation_delta_is_against_the_same_sides_stock():
    cont = {"kvpress:stock": {"0": {"nll": 100.0, "tokens": 50, "kept": 1.0}},
            "kvpress:tova@0.25": {"0": {"nll": 110.0, "tokens": 50, "kept": 0.25}}}
    rows = {r["method"]: r for r in kvpress_side.table_rows(part("kvpress:tova@0.25", {0: ("1", "1")}, cont=cont))}
    assert rows["kvpress:tova@0.25"]["delta_ppl"] == pytest.approx(2.718281828 ** (110 / 50 - 100 / 50) - 1)


def test_bad_lists_and_fractions_are_one_line_errors():
    with pytest.raises(kvpress_side.BenchError, match="--fractions"):
        kvpress_side.parse_fractions("0.25,1.5")
    with pytest.raises(kvpress_side.BenchError, match="--presses"):
        kvpress_side.parse_list("snapkv,h2o", kvpress_side.PRESSES, "presses")
    assert kvpress_side.parse_list("all", kvpress_side.POLICIES, "policies") == list(kvpress_side.POLICIES)


def test_our_rules_at_a_kept_fraction():
    window = kvpress_side.policy_config("window", 0.25, 4096).kv
    assert window.enabled and window.selection == "window" and window.sink_tokens + window.recent_window == 1024
    snap = kvpress_side.policy_config("snapkv", 0.5, 4096).kv
    assert snap.enabled and snap.selection == "snapkv" and snap.keep_fraction == 0.5


def test_our_rules_may_carry_kv_settings():
    assert kvpress_side.parse_policies("window,quest+page_size=8") == ["window", "quest+page_size=8"]
    cfg = kvpress_side.policy_config("quest+page_size=8", 0.25, 4096).kv
    assert (cfg.selection, cfg.keep_fraction, cfg.page_size) == ("quest", 0.25, 8)
    for bad in ("quest+page_size", "nope+page_size=8"):
        with pytest.raises(kvpress_side.BenchError, match="policies"):
            kvpress_side.parse_policies(bad)
