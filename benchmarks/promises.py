"""Does every promise hold on text it was not tuned on? Writes docs/results/promises.md (and .json).

Every preset and every committed calibrated config (docs/results/calibrated/*.json) runs on
the *test* split of every offline corpus at 512- and 4,096-token windows, each against the
stock model in the same run (``evaluate_model``). A preset's promise is the budget it was
picked for; a calibrated config's is the budget recorded in its ``calibration`` entry (set
from calibration splits only). A cell above its promise is a failure, shown as one. Usage:

    python benchmarks/promises.py [--max-tokens 8192] [--windows 512 4096] [--corpora wiki news code pydoc] [--out docs/results]
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
from quicksilver.config import Config
from quicksilver.corpora import OFFLINE_CORPORA
from quicksilver.evaluate import evaluate_model
from quicksilver.results_io import write_atomic, write_json_atomic

# The budget each preset was picked for (config.py); `off` promises the stock model itself.
PRESET_PROMISES = {"off": 0.0, "halting": 0.02, "kvskip": 0.02, "fusion": 0.02, "amq": 0.02, "all": 0.03}


def promise_of(name: str, config: Config) -> float:
    """A config's promise: its own metadata where it has one, else the table above."""
    declared = getattr(config, "promise", None)
    if isinstance(declared, (int, float)):
        return float(declared)
    if config.calibration is not None:
        return float(config.calibration["budget"])
    return PRESET_PROMISES[name]


def configs(calibrated_dir: Path, only: list[str] | None) -> list[tuple[str, Config]]:
    found = [(name, Config.preset(name)) for name in PRESET_PROMISES]
    found += [(f"calibrated/{p.stem}", Config.load(p)) for p in sorted(calibrated_dir.glob("*.json"))]
    return [(n, c) for n, c in found if only is None or n in only]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--windows", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--corpora", nargs="+", default=list(OFFLINE_CORPORA))
    ap.add_argument("--configs", nargs="+", default=None, help="names to run (default: every preset and calibrated config)")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    out = Path(args.out)
    loaded = load_model("smollm2-135m")
    rows = []
    for name, config in configs(out / "calibrated", args.configs):
        promise = promise_of(name, config)
        for corpus in args.corpora:
            for window in args.windows:
                t0 = time.time()
                r = evaluate_model(corpus=corpus, split="test", window=window, max_tokens=args.max_tokens, config=config, loaded=loaded)
                delta = r.get("relative_delta_perplexity", 0.0)  # off runs the stock model alone
                rows.append({"config": name, "promise": promise, "corpus": corpus, "window": window, "tokens": r["tokens"],
                             "relative_delta_perplexity": delta, "flop_reduction": r.get("flop_reduction", 0.0),
                             "speedup": r.get("speedup", 1.0), "held": delta <= promise + 1e-12})
                print(f"{name} {corpus} {window}: {delta * 100:+.2f}% (promise {promise * 100:g}%) ({time.time() - t0:.0f}s)",
                      file=sys.stderr, flush=True)
    meta = {"command": "python benchmarks/promises.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads", "python": platform.python_version()}
    write_json_atomic(out / "promises.json", {"meta": meta, "rows": rows})
    write_atomic(out / "promises.md", markdown(rows, meta, args))


def markdown(rows: list[dict], meta: dict, args) -> str:
    failures = [r for r in rows if not r["held"]]
    lines = [
        f"Command: `{meta['command']}` — {meta['date']} — {meta['machine']}; Python {meta['python']} (its standard library is the "
        f"`code` and `pydoc` text); smollm2-135m float32, test splits, first {args.max_tokens} tokens per cell, each cell against "
        f"the stock model in the same run. **{len(failures)} of {len(rows)} cells miss their promise** (marked FAIL).",
        "",
        "| config | promise | corpus | window | tokens | rel. ΔPPL | held? | FLOP reduction | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['config']} | {r['promise'] * 100:g}% | {r['corpus']} | {r['window']} | {r['tokens']} "
                     f"| {r['relative_delta_perplexity'] * 100:+.2f}% | {'yes' if r['held'] else '**FAIL**'} "
                     f"| {r['flop_reduction'] * 100:.1f}% | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
