"""Calibrated configs at budgets 0.5%, 1% and 2%: the worst of several calibration splits binds.

Runs what ``quicksilver calibrate --budget B --objective O --corpus wiki --corpus news
--corpus code --corpus pydoc`` runs, for each budget and objective, sharing one trial journal
(a trial measured for one budget is reused by the others, and an interrupted run resumes).
Each chosen config is checked on the test split of every corpus: the engine alone against
the stock model's totals, measured once per split (``timed_checks=False``: no speedup;
perplexity and FLOPs are what the promise is about). Usage:

    python benchmarks/calibrate_budgets.py [--objectives flops bitflops] [--corpora wiki news code pydoc] [--tokens 4096] [--mechanisms kv halting] [--out docs/results]

Writes ``calibrated/<objective>-<budget>.json`` (configs that ``--config`` loads),
``calibration.json`` (every trial) and ``calibration.md`` (the table for RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.calibrate import calibrate  # noqa: E402
from quicksilver.corpora import OFFLINE_CORPORA  # noqa: E402
from quicksilver.results_io import write_atomic, write_json_atomic  # noqa: E402

BUDGETS = (0.005, 0.01, 0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--objectives", nargs="+", default=["flops"], choices=["flops", "bitflops", "time"],
                    help="runs of other objectives already in calibration.json are kept")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS),
                    help="a subset of 0.005 0.01 0.02 (the others are listed as not reached)")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--also-windows", type=int, nargs="*", default=[512],
                    help="further context lengths whose calibration splits bind too (the promise is checked there)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of each split (calibration and test)")
    ap.add_argument("--mechanisms", nargs="+", default=None, help="restrict the search (default: all four)")
    ap.add_argument("--corpora", nargs="+", default=list(OFFLINE_CORPORA), help="searched together: the worst one binds")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "calibrated").mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m")
    runs = []
    for objective in args.objectives:
        for budget in args.budgets:
            t0 = time.time()

            def on_trial(i, n, what):
                print(f"  [{objective} {budget * 100:g}%] trial {i + 1}: {what}", file=sys.stderr, flush=True)

            config, report = calibrate(budget, corpus=args.corpora, objective=objective, window=args.window, max_tokens=args.tokens,
                                       mechanisms=args.mechanisms, also_windows=args.also_windows,
                                       journal=out / "calibrated" / "trials.jsonl", loaded=loaded, on_trial=on_trial,
                                       timed_checks=False)
            path = out / "calibrated" / f"{objective}-{budget * 100:g}pct.json"
            config.save(path)
            runs.append({"objective": objective, "budget": budget, "config_file": path.name, "seconds": time.time() - t0, **report})
            cal = config.calibration
            print(f"[{objective} {budget * 100:g}%] {cal['setting']}: " + ", ".join(
                f"{k} {v['relative_delta_perplexity'] * 100:+.2f}% FLOPs -{v['flop_reduction'] * 100:.1f}%"
                for k, v in cal["test_splits"].items()) + f" ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
            # Tables after every budget: an interrupted run leaves the budgets it finished (the rest listed as not reached).
            done = {(r["objective"], r["budget"]) for r in runs}
            pending = [f"{o} {b * 100:g}%" for o in args.objectives for b in BUDGETS if (o, b) not in done]
            write_tables(runs, args, loaded, pending)


def write_tables(runs: list[dict], args, loaded, pending: list[str]) -> None:
    out = Path(args.out)
    meta = run_meta(dtype=str(loaded.dtype).removeprefix("torch."))
    runs = [{**r, "meta": meta} for r in runs]
    previous = out / "calibration.json"
    if previous.is_file():  # keep the runs of objectives this invocation did not run, searched on the same corpora
        kept = [r for r in json.loads(previous.read_text()).get("runs", []) if r["objective"] not in args.objectives and "meta" in r
                and r["config"]["calibration"].get("corpora") == args.corpora]
        runs = kept + runs
    write_json_atomic(out / "calibration.json", {"runs": runs, "not_reached": pending})
    write_atomic(out / "calibration.md", markdown(runs, args, pending))


def markdown(runs: list[dict], args, pending: list[str] = ()) -> str:
    metas = list({r["meta"]["command"]: r["meta"] for r in runs}.values())
    corpora = runs[0]["config"]["calibration"]["corpora"]
    windows = [args.window, *[w for w in args.also_windows if w != args.window]]
    suffixes = [""] + [f"@{w}" for w in windows[1:]]
    lines = [
        "; ".join(header({**m, "commands": [m["command"]]}) for m in metas)
        + f"; smollm2-135m {metas[0].get('dtype', 'float32')} (the stock model in the same dtype), "
        f"{' and '.join(str(w) for w in windows)}-token windows, first {args.tokens} tokens of each split. Searched on the "
        f"calibration splits of {', '.join(f'`{c}`' for c in corpora)} together, at {' and '.join(str(w) for w in windows)} "
        f"tokens: a config fits only if the *worst* of these splits stays within budget x 0.75 (margin 0.25). Checked on every "
        f"test split at the same windows (never seen by the search; cell: {' / '.join(str(w) for w in windows)} tokens), the "
        f"engine against the stock model on the same windows. A test split above the budget is a failure (**no**).",
        "",
        "| objective | budget | chosen setting | worst calibration ΔPPL | "
        + " | ".join(f"{c} test ΔPPL | held?" for c in corpora) + " | FLOP reduction (test, per corpus) | trials |",
        "|---|---|---|---|" + "---|---|" * len(corpora) + "---|---|",
    ]
    for r in runs:
        cal = r["config"]["calibration"]
        tests = cal["test_splits"]
        cells = " | ".join(
            " / ".join(f"{tests[c + x]['relative_delta_perplexity'] * 100:+.2f}%" if c + x in tests else "not run" for x in suffixes)
            + f" | {'yes' if all(tests.get(c + x, {}).get('within_budget', False) for x in suffixes) else '**no**'}"
            for c in corpora)
        saved = ", ".join(f"{tests[c]['flop_reduction'] * 100:.1f}%" for c in corpora)
        lines.append(f"| {r['objective']} | {r['budget'] * 100:g}% | {cal['setting']} | {cal['calibration_split']['relative_delta_perplexity'] * 100:+.2f}% "
                     f"| {cells} | {saved} | {len(r['trials'])} |")
    if pending:
        lines += ["", f"**Not reached** (the run was stopped before these budgets; no config is committed for them): {', '.join(pending)}."]
    lines += ["", "Config files in `docs/results/calibrated/`: " + ", ".join(f"`{r['config_file']}`" for r in runs)
              + " (use with `--config`); the trial journal `trials.jsonl` beside them lets a rerun resume (it also holds the "
              "stock model's totals per split and older float32 trials, which a bfloat16 run ignores)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
