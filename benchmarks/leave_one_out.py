"""Leave one domain out: calibrate on every offline corpus but one, check on the one left out.

For each corpus in turn, ``calibrate(budget, corpus=<all others>, heldout=[<it>])`` searches
on the others' calibration splits (the worst one binds) and evaluates the chosen config on
the test split of the one left out, which no part of the search saw. Trials go to the
journal the calibrated configs were searched with (``calibrated/trials.jsonl``): a trial on a
corpus's calibration split is the same whichever other corpora are searched beside it, so
only the points the new searches reach are measured. Test splits are checked with the engine
alone against the stock model's journaled totals (``timed_checks=False``: no speedup).
Writes docs/results/leave_one_out.md (and .json). Usage:

    python benchmarks/leave_one_out.py [--budgets 0.01] [--window 4096] [--also-windows 512] [--tokens 4096] [--mechanism kv halting] [--out docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.calibrate import calibrate  # noqa: E402
from quicksilver.corpora import OFFLINE_CORPORA  # noqa: E402
from quicksilver.results_io import write_atomic, write_json_atomic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.01])
    ap.add_argument("--objective", default="flops")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--also-windows", type=int, nargs="*", default=[512],
                    help="further context lengths whose calibration splits bind too and whose left-out test split is checked")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--corpora", nargs="+", default=list(OFFLINE_CORPORA))
    ap.add_argument("--left-out", nargs="+", default=None, help="leave out only these corpora, in turn (default: each of --corpora)")
    ap.add_argument("--mechanism", nargs="+", default=None, help="restrict the search (default: all)")
    ap.add_argument("--journal", default=None, help="trial journal (default OUT/calibrated/trials.jsonl)")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m")
    journal = Path(args.journal) if args.journal else out / "calibrated" / "trials.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for budget in args.budgets:
        for left in args.left_out or args.corpora:
            others = [c for c in args.corpora if c != left]
            t0 = time.time()
            config, _ = calibrate(budget, corpus=others, objective=args.objective, window=args.window, max_tokens=args.tokens,
                                  mechanisms=args.mechanism, heldout=[left], journal=journal, also_windows=args.also_windows, loaded=loaded, timed_checks=False,
                                  on_trial=lambda i, n, what: print(f"  [{budget * 100:g}% without {left}] trial {i + 1}: {what}",
                                                                    file=sys.stderr, flush=True))
            cal = config.calibration
            rows.append({"budget": budget, "left_out": left, "calibrated_on": others, "setting": cal["setting"],
                         "calibration_splits": cal["calibration_splits"], "test_splits": cal["test_splits"],
                         "config": config.to_dict(), "seconds": time.time() - t0})
            for key in [k for k in cal["test_splits"] if k.split("@")[0] == left]:
                r = cal["test_splits"][key]
                print(f"{budget * 100:g}% without {left}: {cal['setting']}: {key} test {r['relative_delta_perplexity'] * 100:+.2f}% "
                      f"({'held' if r['within_budget'] else 'NOT held'})", file=sys.stderr, flush=True)
            # Tables after every row: an interrupted run leaves what it finished, the rest listed as not reached.
            done = {(row["budget"], row["left_out"]) for row in rows}
            write_tables(rows, args, loaded, [(b, c) for b in args.budgets for c in args.left_out or args.corpora if (b, c) not in done])


def write_tables(rows: list[dict], args, loaded, pending: list[tuple[float, str]]) -> None:
    out = Path(args.out)
    meta = run_meta(dtype=str(loaded.dtype).removeprefix("torch."))
    write_json_atomic(out / "leave_one_out.json", {"meta": meta, "rows": rows})
    windows = [args.window, *[w for w in args.also_windows if w != args.window]]
    suffixes = [""] + [f"@{w}" for w in windows[1:]]

    def left_checks(row):
        return [row["test_splits"][row["left_out"] + x] for x in suffixes]

    failures = sum(1 for row in rows if not all(r["within_budget"] for r in left_checks(row)))
    # A searched corpus's own test split over budget is a failure too (of the calibration, not of leaving one out).
    searched = [f"{row['budget'] * 100:g}% without {row['left_out']}: {c}{x} test" for row in rows for c in row["calibrated_on"]
                for x in suffixes if not row["test_splits"][c + x]["within_budget"]]
    lines = [
        header(meta) + "; "
        + f"smollm2-135m {meta['dtype']} (the stock model in the same dtype), objective {args.objective}, margin 0.25, "
        f"{' and '.join(map(str, windows))}-token windows (a cell: {' / '.join(map(str, windows))}), first {args.tokens} tokens "
        f"of each split"
        + (f", search restricted to {', '.join(args.mechanism)}" if args.mechanism else "")
        + f". Each row calibrates on the other corpora's calibration splits (the worst binds) and checks on the left-out "
        f"corpus's test split, which no part of the search saw. **{failures} of {len(rows)} left-out checks miss the budget** "
        f"(marked FAIL); **{len(searched)} test splits of searched corpora miss it** (marked FAIL in the last column"
        + (f": {'; '.join(searched)}" if searched else "") + ").",
        "",
        "| budget | left out | calibrated on (worst binds) | chosen setting | worst calibration ΔPPL | left-out test ΔPPL | held? "
        "| FLOP reduction there | searched corpora's test ΔPPL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        worst = max(c["relative_delta_perplexity"] for c in row["calibration_splits"].values())
        checks = left_checks(row)
        held_out = " / ".join(f"{r['relative_delta_perplexity'] * 100:+.2f}%" for r in checks)
        seen = ", ".join(f"{c} " + " / ".join(f"{row['test_splits'][c + x]['relative_delta_perplexity'] * 100:+.2f}%"
                                              + ("" if row["test_splits"][c + x]["within_budget"] else " **FAIL**") for x in suffixes)
                         for c in row["calibrated_on"])
        lines.append(f"| {row['budget'] * 100:g}% | {row['left_out']} | {', '.join(row['calibrated_on'])} | {row['setting']} "
                     f"| {worst * 100:+.2f}% | {held_out} "
                     f"| {'yes' if all(r['within_budget'] for r in checks) else '**FAIL**'} | {checks[0]['flop_reduction'] * 100:.1f}% | {seen} |")
    if pending:
        lines += ["", "**Not reached** (the run was stopped before these; `" + meta["command"] + "` resumes from the journal): "
                  + ", ".join(f"{b * 100:g}% without {c}" for b, c in pending) + "."]
    write_atomic(out / "leave_one_out.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
