"""Calibrated configs at budgets 0.5%, 1% and 2%: searched on wiki's calibration split, checked on held-out text.

Runs what ``quicksilver calibrate --budget B --objective O --heldout news`` runs, for each
budget and objective, sharing one trial journal (a trial measured for one budget is reused
by the others). Usage:

    python benchmarks/calibrate_budgets.py [--objectives flops bitflops] [--out docs/results]

Writes ``calibrated/<objective>-<budget>.json`` (configs that ``--config`` loads),
``calibration.json`` (every trial) and ``calibration.md`` (the table for RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from quicksilver import load_model
from quicksilver.calibrate import calibrate
from quicksilver.results_io import write_atomic, write_json_atomic

BUDGETS = (0.005, 0.01, 0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--objectives", nargs="+", default=["flops"], choices=["flops", "bitflops", "time"],
                    help="runs of other objectives already in calibration.json are kept")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "calibrated").mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m")
    runs = []
    for objective in args.objectives:
        for budget in BUDGETS:
            t0 = time.time()

            def on_trial(i, n, what):
                print(f"  [{objective} {budget * 100:g}%] trial {i + 1}: {what}", file=sys.stderr, flush=True)

            config, report = calibrate(budget, objective=objective, window=args.window, max_tokens=args.tokens, heldout=["news"],
                                       journal=out / "calibrated" / "trials.jsonl", loaded=loaded, on_trial=on_trial)
            path = out / "calibrated" / f"{objective}-{budget * 100:g}pct.json"
            config.save(path)
            runs.append({"objective": objective, "budget": budget, "config_file": path.name, "seconds": time.time() - t0, **report})
            cal = config.calibration
            print(f"[{objective} {budget * 100:g}%] {cal['setting']}: " + ", ".join(
                f"{k} {v['relative_delta_perplexity'] * 100:+.2f}% FLOPs -{v['flop_reduction'] * 100:.1f}% {v['speedup']:.2f}x"
                for k, v in cal["test_splits"].items()) + f" ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    meta = {
        "command": "python benchmarks/calibrate_budgets.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "torch": torch.__version__,
    }
    for r in runs:
        r["meta"] = meta
    previous = out / "calibration.json"
    if previous.is_file():  # keep the runs of objectives this invocation did not run
        kept = [r for r in json.loads(previous.read_text()).get("runs", []) if r["objective"] not in args.objectives and "meta" in r]
        runs = kept + runs
    write_json_atomic(out / "calibration.json", {"runs": runs})
    write_atomic(out / "calibration.md", markdown(runs, args))


def markdown(runs: list[dict], args) -> str:
    metas = list({r["meta"]["command"]: r["meta"] for r in runs}.values())
    lines = [
        "; ".join(f"Command: `{m['command']}` — {m['date']} — {m['machine']} — torch {m['torch']}" for m in metas)
        + f"; smollm2-135m float32, {args.window}-token windows, first {args.tokens} tokens of each split. Searched on `wiki` "
        f"calibration within budget x 0.75 (margin 0.25); checked on the `wiki` and `news` test splits, stock model and config interleaved.",
        "",
        "| objective | budget | chosen setting | wiki calibration ΔPPL | wiki test ΔPPL | held? | FLOP reduction | bit-weighted | speedup "
        "| news test ΔPPL | held? | news FLOP reduction | news speedup | trials |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        cal = r["config"]["calibration"]
        w, n = cal["test_splits"]["wiki"], cal["test_splits"]["news"]
        lines.append(
            f"| {r['objective']} | {r['budget'] * 100:g}% | {cal['setting']} | {cal['calibration_split']['relative_delta_perplexity'] * 100:+.2f}% "
            f"| {w['relative_delta_perplexity'] * 100:+.2f}% | {'yes' if w['within_budget'] else '**no**'} | {w['flop_reduction'] * 100:.1f}% "
            f"| {w['bit_weighted_flop_reduction'] * 100:.1f}% | {w['speedup']:.2f}x | {n['relative_delta_perplexity'] * 100:+.2f}% "
            f"| {'yes' if n['within_budget'] else '**no**'} | {n['flop_reduction'] * 100:.1f}% | {n['speedup']:.2f}x | {len(r['trials'])} |"
        )
    lines += ["", "Config files in `docs/results/calibrated/`: " + ", ".join(f"`{r['config_file']}`" for r in runs)
              + " (use with `--config`); the trial journal `trials.jsonl` beside them lets a rerun resume."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
