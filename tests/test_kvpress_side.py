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
    assert "| 25% | needle 2,048 | 1 (snapkv) | 2 (snapkv) | as good or better | 2 (snapkv) | as good or better |" in text


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


def long_context_json():
    """A small benchmarks/long_context.py JSON: wiki 2048, three trials, one rule at 25%, one other corpus and rule to skip."""
    def detail(got):
        keys = ["11111", "22222", "33333"]
        return [{"context": 2048, "depth": 0.1 * (i + 1), "key": k, "answer": f" {g}", "correct": g == k, "kept_fraction": 0.25}
                for i, (k, g) in enumerate(zip(keys, got))]
    entry = {"corpus": "wiki", "context": 2048, "keep": 0.25, "seed": 0}
    return {
        "needle": {"wiki/2048/window/0.25": {**entry, "rule": "window", "trials_detail": detail(["11111", "0", "0"])},
                   "wiki/2048/snapkv/0.25": {**entry, "rule": "snapkv", "trials_detail": detail(["11111", "22222", "33333"])},
                   "news/2048/window/0.25": {**entry, "corpus": "news", "rule": "window", "trials_detail": detail(["0", "0", "0"])}},
        "needle_baseline": {"wiki/2048/0": {"0": {"answer": " 11111", "correct": True}, "1": {"answer": " 22222", "correct": True},
                                            "2": {"answer": " 0", "correct": False}}},
        "continuation": {"baseline/wiki/4096": {"nll": [100.0, 200.0]},
                         "wiki/4096/window/0.25": {"corpus": "wiki", "context": 4096, "rule": "window", "keep": 0.25,
                                                   "continuation_tokens": 512, "nll": [110.0, 210.0], "kept": [0.25, 0.26]},
                         "wiki/2048/window/0.25": {"corpus": "wiki", "context": 2048, "rule": "window", "keep": 0.25, "nll": [1.0]}},
    }


def test_our_columns_come_from_long_context_json_on_the_same_trials():
    ours = kvpress_side.ours_from_long_context(long_context_json(), "wiki", continuation_context=4096)
    needle = ours["needle"]["2048"]
    assert set(needle) == {"quicksilver:window@0.25", "quicksilver:stock"}  # snapkv is not one of ours; news is another corpus
    assert needle["quicksilver:window@0.25"]["1"] == {"key": "22222", "depth": 0.2, "answer": " 0", "correct": False, "kept": 0.25}
    assert needle["quicksilver:stock"]["2"] == {"key": "33333", "depth": pytest.approx(0.3), "answer": " 0", "correct": False, "kept": 1.0}
    assert ours["continuation"]["quicksilver:stock"]["1"]["nll"] == 200.0
    assert ours["continuation"]["quicksilver:window@0.25"]["1"] == {"nll": 210.0, "tokens": 512, "kept": 0.26}
    assert "quicksilver:window@0.25" in ours["continuation"] and len(ours["continuation"]) == 2  # the 2,048 chunk is not ours

    # kvpress ran trials 0 and 1 (same keys) and chunk 0: every cell counts only those
    kv = part("kvpress:snapkv@0.25", {0: ("11111", "11111"), 1: ("22222", "22222")})
    kv["needle"]["2048"]["kvpress:stock"] = {"0": {"key": "11111", "depth": 0.1, "answer": " 11111", "correct": True, "kept": 1.0},
                                             "1": {"key": "22222", "depth": 0.2, "answer": " 2222", "correct": False, "kept": 1.0}}
    kv["continuation"] = {"kvpress:stock": {"0": {"nll": 100.0, "tokens": 512, "kept": 1.0}},
                          "kvpress:snapkv@0.25": {"0": {"nll": 120.0, "tokens": 512, "kept": 0.25}}}
    both = kvpress_side.with_ours(kv, ours, "`lc.json`")
    rows = {r["method"]: r for r in kvpress_side.table_rows(both)}
    assert rows["quicksilver:window@0.25"]["needle"]["2048"] == (1, 2)
    assert rows["kvpress:snapkv@0.25"]["needle"]["2048"] == (2, 2)
    assert rows["quicksilver:window@0.25"]["delta_ppl"] == pytest.approx(2.718281828 ** (10 / 512) - 1)
    assert kvpress_side.stock_agreement(both) == {"2048": (1, 1, 2, ["1"])}
    text = kvpress_side.render_markdown(both)
    assert f"stock model's perplexity on them: {2.718281828 ** (100 / 512):.3f} in kvpress's venv, {2.718281828 ** (100 / 512):.3f} in ours" in text
    assert "read from `lc.json`" in text and "1/2 identical texts (differ: trial 1), 1/2 equally right or wrong" in text
    assert "| 25% | needle 2,048 | 2 (snapkv) | 1 (window) | **worse** | 1 (window) | **worse** |" in text
    assert "worse** than kvpress's best press at: needle 2,048 at 25%." in text and "evicting rules alone are **worse** at: needle 2,048" in text


def test_the_verdict_also_counts_our_evicting_rules_alone():
    def row(side, rule, got):
        return {"side": side, "rule": rule, "fraction": 0.25, "needle": {"4096": (got, 10)}}
    rows = [row("kvpress", "tova", 2), row("quicksilver", "window", 1), row("quicksilver", "quest+page_size=2", 4)]
    (v,) = kvpress_side.best_against_kvpress(rows, ["4096"])
    assert (v["ours"], v["verdict"]) == ("4 (quest+page_size=2)", "as good or better")
    assert (v["evicting"], v["evicting_verdict"]) == ("1 (window)", "**worse**")
