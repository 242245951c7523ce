"""Leave one domain out: calibrate on every offline corpus but one, check on the one left out.

For each corpus in turn, ``calibrate(budget, corpus=<all others>, heldout=[<it>])`` searches
on the others' calibration splits (the worst one binds) and evaluates the chosen config on
the test split of the one left out, which no part of the search saw. Writes
docs/results/leave_one_out.md (and .json). Usage:

    python benchmarks/leave_one_out.py [--budget 0.01] [--window 4096] [--tokens 8192] [--mechanism kv ...] [--out docs/results]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from quicksilver import load_model
from quicksilver.calibrate import calibrate
from quicksilver.corpora import OFFLINE_CORPORA
from quicksilver.results_io import write_atomic, write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--objective", default="flops")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--corpora", nargs="+", default=list(OFFLINE_CORPORA))
    ap.add_argument("--mechanism", nargs="+", default=None, help="restrict the search (default: all)")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m")
    rows = []
    for left in args.corpora:
        others = [c for c in args.corpora if c != left]
        t0 = time.time()
        config, _ = calibrate(args.budget, corpus=others, objective=args.objective, window=args.window, max_tokens=args.tokens,
                              mechanisms=args.mechanism, heldout=[left], journal=out / "leave_one_out.trials.jsonl", loaded=loaded,
                              on_trial=lambda i, n, what: print(f"  [without {left}] trial {i + 1}: {what}", file=sys.stderr, flush=True))
        cal = config.calibration
        rows.append({"left_out": left, "calibrated_on": others, "setting": cal["setting"], "calibration_splits": cal["calibration_splits"],
                     "test_splits": cal["test_splits"], "config": config.to_dict(), "seconds": time.time() - t0})
        r = cal["test_splits"][left]
        print(f"without {left}: {cal['setting']}: {left} test {r['relative_delta_perplexity'] * 100:+.2f}% "
              f"({'held' if r['within_budget'] else 'NOT held'})", file=sys.stderr, flush=True)
    meta = {"command": "python benchmarks/leave_one_out.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads", "python": platform.python_version()}
    write_json_atomic(out / "leave_one_out.json", {"meta": meta, "rows": rows})
    lines = [
        f"Command: `{meta['command']}` — {meta['date']} — {meta['machine']}; Python {meta['python']}; smollm2-135m float32, budget "
        f"{args.budget * 100:g}% (objective {args.objective}, margin 0.25), {args.window}-token windows, first {args.tokens} tokens of "
        f"each split. A miss on the left-out corpus is a failure.",
        "",
        "| left out | calibrated on (worst binds) | chosen setting | worst calibration ΔPPL | left-out test ΔPPL | held? | FLOP reduction there |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        worst = max(c["relative_delta_perplexity"] for c in row["calibration_splits"].values())
        r = row["test_splits"][row["left_out"]]
        lines.append(f"| {row['left_out']} | {', '.join(row['calibrated_on'])} | {row['setting']} | {worst * 100:+.2f}% "
                     f"| {r['relative_delta_perplexity'] * 100:+.2f}% | {'yes' if r['within_budget'] else '**FAIL**'} "
                     f"| {r['flop_reduction'] * 100:.1f}% |")
    write_atomic(out / "leave_one_out.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
