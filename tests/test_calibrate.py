"""Calibration to a budget and Pareto sweeps: the search's promises, resumability, outputs, CLI errors."""

import itertools
import json

import pytest

from quicksilver.calibrate import (Baseline, Trial, WorstDomainRunner, acting_config, calibrate, config_key, mechanism_levels, parse_budget,
                                   point_config, search)
from quicksilver.config import Config
from quicksilver.errors import QuicksilverError
from quicksilver.sweep import matched_comparison, pareto_front, plan, plot_pareto, to_csv

from test_cli import run_cli


@pytest.mark.parametrize("text,value", [("1%", 0.01), ("0.5%", 0.005), ("0.02", 0.02), (" 2% ", 0.02)])
def test_budget_parses_percentages_and_fractions(text, value):
    assert parse_budget(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "0%", "100%", "150%", "1", "-1%", "nan%"])
def test_bad_budgets_are_rejected(text):
    with pytest.raises(QuicksilverError):
        parse_budget(text)


# A synthetic search problem: two mechanisms, costs that add plus an interaction, savings that compose.
LEVELS = {
    "kv": [(f"w{w}", {"recent_window": w}) for w in (64, 32, 16)],
    "fusion": [(f"l{l}", {"layer": l, "threshold": 0.9}) for l in (3, 2)],
}
COST = {"kv": [0.0, 0.001, 0.004, 0.02], "fusion": [0.0, 0.002, 0.03]}
GAIN = {"kv": [0.0, 0.1, 0.2, 0.3], "fusion": [0.0, 0.15, 0.4]}


class FakeRunner:
    def __init__(self):
        self.by_key = {}
        for combo in itertools.product(range(4), range(3)):
            point = dict(zip(LEVELS, combo))
            self.by_key[config_key(point_config(point, LEVELS))] = point
        self.measured = []

    def measure(self, config):
        point = self.by_key[config_key(config)]
        self.measured.append(point)
        return Trial(json.dumps(point), 0.0, 1, 0, 0.0, 0.0)

    def cost(self, trial):
        p = json.loads(trial.key)
        both = 0.001 if p["kv"] and p["fusion"] else 0.0
        return COST["kv"][p["kv"]] + COST["fusion"][p["fusion"]] + both

    def gain(self, trial):
        p = json.loads(trial.key)
        return 1 - (1 - GAIN["kv"][p["kv"]]) * (1 - GAIN["fusion"][p["fusion"]])


def brute_force(target):
    runner = FakeRunner()
    best, best_gain = None, -1.0
    for point in runner.by_key.values():
        t = Trial(json.dumps(point), 0.0, 1, 0, 0.0, 0.0)
        if runner.cost(t) <= target and runner.gain(t) > best_gain:
            best, best_gain = point, runner.gain(t)
    return best


@pytest.mark.parametrize("target", [0.0005, 0.005, 0.01, 0.03, 0.06])
def test_search_finds_the_best_point_that_fits(target):
    runner = FakeRunner()
    point, steps = search(runner, LEVELS, target)
    assert point == brute_force(target)
    chosen = next(s for s in steps if s.point == point)
    assert chosen.cost <= target  # measured, not predicted
    assert all(s.gain <= chosen.gain for s in steps if s.fits)


class DomainRunner(FakeRunner):
    """The synthetic problem on one domain: KV costs ``kv_scale`` times more here, fusion ``fusion_scale`` times."""

    objective = "flops"
    baseline = Baseline(0.0, 1, 1000, 0.0)

    def __init__(self, kv_scale, fusion_scale):
        super().__init__()
        self.scale = {"kv": kv_scale, "fusion": fusion_scale}

    def measure(self, config):
        trial = super().measure(config)
        trial.flops = round(1000 * (1 - FakeRunner.gain(self, trial)))
        return trial

    def cost(self, trial):
        p = json.loads(trial.key)
        return sum(self.scale[m] * COST[m][p[m]] for m in p) + (0.001 if p["kv"] and p["fusion"] else 0.0)


def test_several_domains_constrain_the_worst_one():
    # wiki tolerates KV windows, code does not; fusion is the reverse.
    domains = {"wiki": DomainRunner(0.4, 6.0), "code": DomainRunner(4.0, 0.2)}
    runner = WorstDomainRunner(domains)
    target = 0.01
    point, steps = search(runner, LEVELS, target)
    best = None
    for p in FakeRunner().by_key.values():
        flops = round(1000 * (1 - GAIN["kv"][p["kv"]]) * (1 - GAIN["fusion"][p["fusion"]]))
        trials = {n: Trial(json.dumps(p), 0.0, 1, flops, 0.0, 0.0) for n in domains}
        if all(d.cost(trials[n]) <= target for n, d in domains.items()) and (best is None or runner.gain(trials) > best[0]):
            best = (runner.gain(trials), p)
    assert point == best[1]
    # Each domain alone would choose differently, and each choice breaks the other domain's budget.
    alone = {n: search(d, LEVELS, target)[0] for n, d in domains.items()}
    assert alone["wiki"] != point and alone["code"] != point
    chosen = next(s for s in steps if s.point == point)
    assert chosen.cost == max(d.cost(Trial(json.dumps(point), 0.0, 1, 0, 0.0, 0.0)) for d in domains.values()) <= target


def test_a_point_stops_at_the_first_domain_that_breaks_the_target():
    domains = {"wiki": DomainRunner(0.4, 6.0), "code": DomainRunner(4.0, 0.2)}
    runner = WorstDomainRunner(domains)
    harsh = point_config({"kv": 3, "fusion": 0}, LEVELS)  # code: 4 x 0.02, wiki: 0.4 x 0.02
    runner.worst["code"] = 1  # code was the worst before: measured first
    trials = runner.measure_within(harsh, 0.01)
    assert list(trials) == ["code"] and runner.cost(trials) > 0.01 and not domains["wiki"].measured
    mild = point_config({"kv": 1, "fusion": 0}, LEVELS)
    assert set(runner.measure_within(mild, 0.01)) == {"wiki", "code"}  # fits: every domain measured


def test_the_grid_stops_at_a_mechanisms_first_level_over_target():
    runner = FakeRunner()
    point, steps = search(runner, LEVELS, 0.0015)  # kv level 2 (0.004) and fusion level 1 (0.002) break it
    measured = [s.point for s in steps]
    assert {"kv": 2, "fusion": 0} in measured and {"kv": 0, "fusion": 1} in measured
    assert {"kv": 3, "fusion": 0} not in measured and {"kv": 0, "fusion": 2} not in measured
    assert point == brute_force(0.0015)


def test_search_with_nothing_that_fits_returns_off():
    point, _ = search(FakeRunner(), LEVELS, -1.0)
    assert point == {"kv": 0, "fusion": 0}
    assert point_config(point, LEVELS).is_off


def test_kv_levels_follow_the_window_and_never_exceed_it():
    for window in (128, 512, 4096):
        ws = [s["recent_window"] for _, s in mechanism_levels(window)["kv"]]
        assert ws and all(w < window for w in ws) and ws == sorted(ws, reverse=True)


def test_calibrate_keeps_the_budget_writes_a_loadable_config_and_resumes(tmp_path, tiny_folder_model):
    journal = tmp_path / "trials.jsonl"
    args = dict(window=128, max_tokens=256, mechanisms=["kv"], heldout=["news"], journal=journal, model=tiny_folder_model[1])
    config, report = calibrate(0.02, **args)
    cal = config.calibration
    assert cal["calibration_split"]["relative_delta_perplexity"] <= cal["search_target"] + 1e-12
    assert set(cal["test_splits"]) == {"wiki", "news"}
    for r in cal["test_splits"].values():
        assert r["within_budget"] == (r["relative_delta_perplexity"] <= 0.02)
    config.save(tmp_path / "c.json")
    again = Config.load(tmp_path / "c.json")
    assert config_key(again) == config_key(config) and again.calibration["budget"] == 0.02
    # A line cut short by an interruption is ignored; every finished trial is reused.
    with open(journal, "a") as f:
        f.write('{"context": "x", "tri')
    config2, report2 = calibrate(0.02, **args)
    assert report2["resumed_trials"] == len({json.dumps(t["point"], sort_keys=True) for t in report["trials"]})
    assert config_key(config2) == config_key(config)


def test_a_kv_window_that_covers_the_context_acts_as_kv_off():
    alone = Config.from_dict({"kv": {"enabled": True, "sink_tokens": 4, "recent_window": 508}})
    assert acting_config(alone, 512).is_off  # 4 + 508 keys: the first query that drops one is the 513th
    assert acting_config(alone, 513) is alone
    stack = Config.preset("all")
    short = acting_config(stack, 512)
    assert not short.kv.enabled and short.halting == stack.halting and short.amq == stack.amq and short.calibration is None
    quest = Config.from_dict({"kv": {"enabled": True, "selection": "quest", "recent_window": 4096}})
    assert acting_config(quest, 512) is quest  # only the position window is known to drop nothing


def test_calibrate_binds_further_windows_like_corpora_and_checks_them(tmp_path, tiny_folder_model):
    journal = tmp_path / "trials.jsonl"
    # Levels at 32 tokens are windows 24 and 16; at 24 tokens the 24-key window drops nothing.
    config, report = calibrate(0.5, window=32, also_windows=[24], max_tokens=64, mechanisms=["kv"], journal=journal,
                               model=tiny_folder_model[1], timed_checks=False)
    cal = config.calibration
    assert cal["also_windows"] == [24]
    assert set(cal["calibration_splits"]) == set(cal["test_splits"]) == {"wiki", "wiki@24"}
    worst = max(c["relative_delta_perplexity"] for c in cal["calibration_splits"].values())
    assert cal["calibration_split"]["relative_delta_perplexity"] == pytest.approx(worst) and worst <= cal["search_target"]
    for r in cal["test_splits"].values():
        assert r["within_budget"] == (r["relative_delta_perplexity"] <= 0.5)
    idle = config_key(point_config({"kv": 1}, mechanism_levels(32)))
    keys = [json.loads(line)["trial"]["key"] for line in journal.read_text().splitlines() if "trial" in line]
    assert keys.count(idle) == 1  # measured at 32 tokens only; at 24 it is the stock model's totals


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget", "abc"], "not a number"),
        (["--budget", "150%"], "below 100%"),
        (["--budget", "1%", "--objective", "speed"], "unknown objective"),
        (["--budget", "1%", "--corpus", "c4"], "calibration and test splits"),
        (["--budget", "1%", "--corpus", "code", "--corpus", "c4"], "calibration and test splits"),
        (["--budget", "1%", "--corpus", "nope"], "unknown corpus"),
        (["--budget", "1%", "--margin", "1.5"], "margin"),
        (["--budget", "1%", "--mechanism", "warp"], "unknown mechanism"),
        (["--budget", "1%", "--output", "/no/such/dir/c.json"], "does not exist"),
        (["--budget", "1%", "--objective", "flops", "--mechanism", "amq"], "nothing to search"),
    ],
)
def test_calibrate_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_pareto_front_keeps_only_undominated_points():
    pts = [(0.0, 0.0), (0.1, 0.5), (0.2, 0.4), (0.3, 2.0), (0.25, 3.0), (0.3, 1.0)]
    assert pareto_front(pts) == [0, 2, 5]


def _row(series, kind, label, cost, saving):
    return {"series": series, "kind": kind, "label": label, "relative_delta_perplexity": cost, "saving": saving,
            "flop_reduction": saving, "speedup": 1.0 + saving}


def test_matched_comparison_reports_losses_as_plainly_as_wins():
    rows = [_row("halting", "mechanism", "h", 0.004, 0.00), _row("halting", "baseline", "static", 0.004, 0.05),
            _row("amq", "mechanism", "a", 0.009, 0.40), _row("amq", "baseline", "int8", 0.009, 0.30),
            _row("fusion", "mechanism", "f", 0.001, 0.01),
            _row("kv", "mechanism", "w", 0.001, 0.10)]
    verdicts = {(m["series"], m["budget"]): m["verdict"] for m in matched_comparison(rows)}
    assert verdicts[("halting", 0.005)] == "loses"
    assert verdicts[("amq", 0.01)] == "beats" and verdicts[("amq", 0.005)] == "ties"  # neither fits 0.5%
    assert verdicts[("kv", 0.02)] == "ties (same policy)"
    assert verdicts[("fusion", 0.01)] == "no baseline"


def test_csv_and_png_outputs():
    rows = [_row("kv", "mechanism", "w, 512", 0.01, 0.2), _row("amq", "baseline", "int8", 0.009, 0.3)]
    text = to_csv(rows)
    assert text.splitlines()[0].startswith("series,kind,label") and '"w, 512"' in text
    assert plot_pareto(rows, "t")[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_plan_has_matched_baselines_and_rejects_unknown_series():
    rows = plan(["halting", "amq", "kv"], 4096)
    kinds = {(s, k) for s, k, _, _ in rows}
    assert ("halting", "baseline") in kinds and ("amq", "baseline") in kinds and ("kv", "baseline") not in kinds
    for _, _, label, data in rows:
        Config.from_dict({**data, "name": label})  # every row is a valid config
    with pytest.raises(QuicksilverError):
        plan(["warp"], 4096)


def test_sweep_cli_writes_csv_json_and_png(monkeypatch, capsys, tmp_path, tiny_folder_model):
    out = tmp_path / "s"
    code, stdout, _ = run_cli(monkeypatch, capsys, "sweep", "--model", tiny_folder_model[0], "--series", "kv", "--window", "128",
                              "--max-tokens", "256", "-o", str(out))
    assert code == 0 and "verdict" in stdout
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["rows"]) == len(mechanism_levels(128)["kv"])
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "sweep.csv").read_text().splitlines()) == len(data["rows"]) + 1


def test_decode_time_trials_time_generation_against_hf_and_keep_their_own_journal(tmp_path):
    from types import SimpleNamespace

    import torch

    from conftest import tiny_llama
    from quicksilver.calibrate import TrialRunner, mechanism_levels, point_config

    model = tiny_llama()
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    ids = torch.randint(2, 99, (96,), generator=torch.Generator().manual_seed(0))
    journal = tmp_path / "j.jsonl"
    levels = mechanism_levels(64, "decode-time")
    assert levels["amq"][0][1]["head_bits"] == 8 and "head_bits" not in mechanism_levels(64)["amq"][0][1]
    config = point_config({"amq": 1}, levels)
    runner = TrialRunner(model, tok, ids, 64, None, "wiki", "decode-time", {"model": "tiny", "dtype": "float32", "device": "cpu"}, journal)
    trial = runner.measure(config)
    assert trial.seconds > 0 and trial.base_seconds > 0 and runner.gain(trial) < 1  # timings, not asserted further
    assert abs(runner.cost(trial)) < 0.5  # int8 weights: a small perplexity change on the tiny model
    # The same context under the prefill objective does not reuse generation timings.
    assert TrialRunner(model, tok, ids, 64, None, "wiki", "time", {"model": "tiny", "dtype": "float32", "device": "cpu"}, journal).resumed == 0
    assert TrialRunner(model, tok, ids, 64, None, "wiki", "decode-time", {"model": "tiny", "dtype": "float32", "device": "cpu"}, journal).resumed == 1


def test_journaled_trials_count_only_for_the_code_that_measured_them(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from conftest import tiny_llama
    from quicksilver import results_io, trials
    from quicksilver.calibrate import TrialRunner, mechanism_levels, point_config

    model = tiny_llama()
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    ids = torch.randint(2, 99, (96,), generator=torch.Generator().manual_seed(0))
    journal, context = tmp_path / "j.jsonl", {"model": "tiny", "dtype": "float32", "device": "cpu"}
    assert results_io.code_fingerprint() == trials.code_fingerprint() and len(trials.code_fingerprint()) == 16
    TrialRunner(model, tok, ids, 64, None, "wiki", "flops", context, journal).measure(point_config({"kv": 1}, mechanism_levels(64)))
    assert TrialRunner(model, tok, ids, 64, None, "wiki", "flops", context, journal).resumed == 1
    monkeypatch.setattr(results_io, "_FINGERPRINT", "another-version")  # the package's source changed since
    again = TrialRunner(model, tok, ids, 64, None, "wiki", "flops", context, journal)
    assert again.resumed == 0 and again.baseline is not None  # the stock totals are re-measured too
    assert len(journal.read_text().splitlines()) == 3  # baseline, trial, and the new code's baseline
