"""Does every promise hold on text it was not tuned on? Writes docs/results/promises.md (and .json).

Every preset that promises a perplexity budget (``PRESET_INFO``) and every committed
calibrated config (docs/results/calibrated/*.json) runs on the *test* split of every
offline corpus at 512- and 4,096-token windows. A preset's promise is its
``PRESET_INFO`` budget; a calibrated config's is the budget recorded in its
``calibration`` entry (set from calibration splits only). A cell above its promise is a
failure, shown as one. Left out, and said so in the table: presets whose promise is
equality with the stock model (``off``, ``lossless``: tests/test_engine.py and
tests/test_speculative.py check it) and the baselines (``int8``, ``int4``), which promise
nothing.

Each cell is the engine alone on the split's windows against the stock model's totals on
the same windows, measured once per (corpus, window) in the same dtype and journaled with
every cell (``calibrate.TrialRunner``), so a run in chunks resumes and the calibrated
configs' 4,096-token cells reuse their calibration checks. Perplexity and FLOPs are
deterministic; no wall clock is taken (that is bench_fast's and bench_decode's job). Usage:

    python benchmarks/promises.py [--max-tokens 4096] [--windows 512 4096] [--corpora wiki news code pydoc]
                                  [--configs kvskip calibrated/flops-1pct ...] [--out docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.calibrate import split_runner  # noqa: E402
from quicksilver.config import PRESET_INFO, Config  # noqa: E402
from quicksilver.corpora import OFFLINE_CORPORA  # noqa: E402
from quicksilver.models import bos_per_window  # noqa: E402
from quicksilver.results_io import write_atomic, write_json_atomic  # noqa: E402

MODEL = "smollm2-135m"


def promise_of(name: str, config: Config) -> float | None:
    """A config's promise: the budget it was calibrated for, else its preset's (None: no promise)."""
    if config.calibration is not None:
        return float(config.calibration["budget"])
    return PRESET_INFO[name].budget


def idle_by_construction(config: Config, window: int) -> bool:
    """True when only position-window KV skipping is on and no query of a ``window``-token
    context is old enough to drop a key (the first that does sits at sinks + recent): the
    engine then attends exactly like the stock model, so the cell is not run."""
    if config.is_off:  # a calibrated config where nothing fit: the stock model itself
        return True
    kv = config.kv
    others = [m for m in ("halting", "fusion", "amq") if getattr(config, m).enabled]
    return (not others and kv.enabled and kv.selection == "window" and kv.recent_window is not None
            and window < kv.sink_tokens + kv.recent_window + 1)


def configs(calibrated_dir: Path, only: list[str] | None) -> tuple[list[tuple[str, Config]], list[str]]:
    """The configs to check, and the presets left out (equality or no promise) with why."""
    found, skipped = [], []
    for name, info in PRESET_INFO.items():
        if info.budget is None:
            skipped.append(f"`{name}` (a baseline: no promise)")
        elif info.budget == 0:
            skipped.append(f"`{name}` (promises equality with the stock model, which the test suite checks)")
        else:
            found.append((name, Config.preset(name)))
    found += [(f"calibrated/{p.stem}", Config.load(p)) for p in sorted(calibrated_dir.glob("*.json"))]
    return [(n, c) for n, c in found if only is None or n in only], skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens of each test split")
    ap.add_argument("--windows", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--corpora", nargs="+", default=list(OFFLINE_CORPORA))
    ap.add_argument("--configs", nargs="+", default=None, help="names to run (default: every preset with a budget and calibrated config)")
    ap.add_argument("--split", default="test", choices=["test", "calibration"],
                    help="calibration: the same cells on the calibration splits, the data a preset's values may be set from "
                         "(writes promises_calibration.md/json)")
    ap.add_argument("--journal-only", action="store_true",
                    help="measure nothing: tabulate the cells the journal holds, the rest shown as not run")
    ap.add_argument("--journal", default=None, help="trial journal (default OUT/calibrated/trials.jsonl, shared with the calibration)")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    out = Path(args.out)
    journal = Path(args.journal) if args.journal else out / "calibrated" / "trials.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_model(MODEL)
    hf_model, tokenizer = loaded
    bos = bos_per_window(MODEL, tokenizer)
    dev = next(hf_model.parameters()).device
    todo, skipped = configs(out / "calibrated", args.configs)
    rows = []
    for window in args.windows:
        for corpus in args.corpora:
            runner = split_runner(hf_model, tokenizer, MODEL, corpus, args.split, window, args.max_tokens, bos, dev, journal,
                                  read_only=args.journal_only)
            for name, config in todo:
                promise = promise_of(name, config)
                if idle_by_construction(config, window):
                    rows.append({"config": name, "promise": promise, "corpus": corpus, "window": window, "tokens": args.max_tokens,
                                 "relative_delta_perplexity": 0.0, "flop_reduction": 0.0, "bit_weighted_flop_reduction": 0.0,
                                 "held": True, "idle": True})
                    continue
                t0 = time.time()
                trial = runner.known(config) if args.journal_only else runner.measure(config)
                if trial is None:
                    rows.append({"config": name, "promise": promise, "corpus": corpus, "window": window, "not_run": True})
                    continue
                b = runner.baseline
                delta = runner.cost(trial)
                rows.append({"config": name, "promise": promise, "corpus": corpus, "window": window, "tokens": trial.count,
                             "relative_delta_perplexity": delta, "flop_reduction": 1.0 - trial.flops / b.flops,
                             "bit_weighted_flop_reduction": 1.0 - trial.bit_flops / b.flops,
                             "held": delta <= promise + 1e-12, "idle": False})
                print(f"{name} {corpus} {window}: {delta * 100:+.2f}% (promise {promise * 100:g}%) ({time.time() - t0:.0f}s)",
                      file=sys.stderr, flush=True)
    meta = run_meta(dtype=str(hf_model.dtype).removeprefix("torch."), skipped=skipped)
    stem = "promises" if args.split == "test" else "promises_calibration"
    write_json_atomic(out / f"{stem}.json", {"meta": meta, "rows": rows})
    write_atomic(out / f"{stem}.md", markdown(rows, meta, args))


def markdown(rows: list[dict], meta: dict, args) -> str:
    missing = [r for r in rows if r.get("not_run")]
    rows = [r for r in rows if not r.get("not_run")]
    failures = [r for r in rows if not r["held"]]
    everything = [*rows, *missing]
    names = list(dict.fromkeys(r["config"] for r in everything))
    cells = {(r["config"], r["corpus"], r["window"]): r for r in rows}
    corpora, windows = list(dict.fromkeys(r["corpus"] for r in everything)), sorted({r["window"] for r in everything})
    lines = [
        header(meta) + "; "
        + f"the `code` and `pydoc` text is this Python's standard library; smollm2-135m {meta['dtype']}, the stock model in the same dtype "
        f"on the same windows. "
        + ("Test splits (never tuned on)" if args.split == "test" else "**Calibration** splits (what preset values may be set from; "
           "not a check of any promise)")
        + f", first {args.max_tokens} tokens of each. Cell: relative perplexity "
        f"increase; below it the change in FLOPs executed (negative: saved). **{len(failures)} of {len(rows)} cells miss their promise** (marked FAIL)"
        + (f"; {len(missing)} cells were not run (*not run*: no CPU time left for them this session)" if missing else "") + ". "
        f"Not run: {'; '.join(meta['skipped']) or 'none'}. *idle*: the config is off (a "
        f"calibrated budget where nothing fit), or KV skipping alone with sinks + recent window at least the context, so no key is ever dropped and the engine attends as the stock model "
        f"(not run). (= stock): run, and nothing fired (halting acts only where drift stays low for long).",
        "",
        "| config | promise | " + " | ".join(f"{c} {w}" for c in corpora for w in windows) + " |",
        "|---|---|" + "---|" * (len(corpora) * len(windows)),
    ]
    for name in names:
        row = []
        for c in corpora:
            for w in windows:
                r = cells.get((name, c, w))
                if r is None:
                    row.append("not run")
                    continue
                mark = "" if r["held"] else " **FAIL**"
                if r["idle"]:
                    row.append("idle")
                    continue
                same = " (= stock)" if r["relative_delta_perplexity"] == 0 and r["flop_reduction"] == 0 else ""
                row.append(f"{r['relative_delta_perplexity'] * 100:+.2f}%{mark}{same}<br>FLOPs {-r['flop_reduction'] * 100:+.1f}%")
        promise = next(r["promise"] for r in [*rows, *missing] if r["config"] == name)
        lines.append(f"| {name} | {promise * 100:g}% | " + " | ".join(row) + " |")
    if failures:
        lines += ["", "Failures: " + "; ".join(f"`{r['config']}` on {r['corpus']} at {r['window']} "
                                              f"({r['relative_delta_perplexity'] * 100:+.2f}% > {r['promise'] * 100:g}%)" for r in failures) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
