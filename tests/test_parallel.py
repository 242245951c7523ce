"""Ray scale-out: a 2-worker local cluster gives the serial run's numbers (eval windows, sweep rows)."""

import json
import math

import pytest

from quicksilver.parallel import optional_value

DETERMINISTIC = ("series", "kind", "label", "relative_delta_perplexity", "flop_reduction", "saving", "perplexity",
                 "baseline_perplexity", "top1_agreement", "kv_fraction", "bits_per_token", "fused_fraction", "mean_exit_layer",
                 "config")


def test_bare_ray_option_means_a_local_cluster():
    assert optional_value(["eval", "--ray"]) == ["eval", "--ray", "local"]
    assert optional_value(["eval", "--ray", "--max-tokens", "9"]) == ["eval", "--ray", "local", "--max-tokens", "9"]
    assert optional_value(["eval", "--ray", "10.0.0.1:6379"]) == ["eval", "--ray", "10.0.0.1:6379"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from quicksilver.parallel import init_ray

    init_ray("local")  # one local cluster of 2 CPUs for the module: Ray starts slowly
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_eval_and_sweep_equal_serial(ray_cluster, tmp_path):
    from tiny_folder import save_tiny_llama

    from quicksilver import evaluate_model
    from quicksilver.config import Config
    from quicksilver.sweep import run_sweep

    folder = save_tiny_llama(tmp_path / "tiny")
    config = Config.from_dict({"kv": {"enabled": True, "recent_window": 8, "sink_tokens": 2}})
    args = dict(window=32, max_tokens=200, config=config)  # 7 windows over 2 workers
    serial, parallel = evaluate_model(folder, **args), evaluate_model(folder, ray="local", **args)
    assert math.isclose(parallel["perplexity"], serial["perplexity"], rel_tol=1e-9)
    assert math.isclose(parallel["baseline"]["perplexity"], serial["baseline"]["perplexity"], rel_tol=1e-9)
    for key in ("tokens", "flops", "kv_fraction", "ledger"):
        assert parallel[key] == serial[key]
    assert math.isclose(parallel["bits_per_byte"], serial["bits_per_byte"], rel_tol=1e-9)

    sweep = dict(model=folder, window=32, max_tokens=96, baselines=False)
    rows, ray_rows = run_sweep(["kv"], **sweep), run_sweep(["kv"], ray="local", **sweep)
    assert len(rows) == len(ray_rows) > 1
    for a, b in zip(rows, ray_rows):  # speedup is a timing ratio: it legitimately differs
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}

    from quicksilver.calibrate import calibrate

    journals = []
    for address in (None, "local"):
        journal = tmp_path / f"trials-{address}.jsonl"
        config, _ = calibrate(0.05, model=folder, mechanisms=["kv"], window=32, max_tokens=96, journal=journal, ray=address)
        entries = [json.loads(line) for line in journal.read_text().splitlines()]  # trials, and the stock totals
        journals.append(([e["trial"] for e in entries if "trial" in e], config.to_dict()))
    (serial_trials, serial_config), (ray_trials, ray_config) = journals
    drop = lambda t: {k: v for k, v in t.items() if k not in ("seconds", "base_seconds")}  # noqa: E731
    assert [drop(t) for t in ray_trials] == [drop(t) for t in serial_trials] and len(serial_trials) > 2
    for c in (serial_config, ray_config):
        for split in c["calibration"]["test_splits"].values():
            split.pop("speedup", None)
    assert ray_config == serial_config
