"""Set a preset's values on calibration splits only: ``kvskip`` and ``all`` (which is built on it).

Each candidate runs on the *calibration* split of every offline corpus at 512- and
4,096-token windows (the engine alone against the stock model's journaled totals, as in
calibrate.py and promises.py, sharing their journal, so a run in chunks resumes). A
candidate fits when its *worst* calibration split, at both windows, stays within the
preset's budget x (1 - margin), calibrate's margin of 0.25: 1.5% for ``kvskip``'s 2%, 2.25%
for ``all``'s 3%; the margin leaves room for text the values were not set on. A preset
takes the fitting candidate that saves the most at 4,096 tokens, pooled over the corpora:
FLOPs for ``kvskip``, bit-weighted FLOPs for ``all`` (its AMQ saves bits, not FLOPs). Test
splits are never read here (benchmarks/promises.py checks them).

Candidates come in chains from mildest to most aggressive; a candidate stops at the first
corpus that breaks the target (``code``, the likely binding one, goes first), and a chain
at its first candidate that breaks (a smaller window costs more). ``all``'s second chain,
int8 only as ``fast`` runs it (per output channel), and its third and fourth, AMQ's own
group-32 int8 tier with and without halting (the fourth measured only if every other chain
broke), were added after the first chain (AMQ with its int4 tier, as the preset was) broke
the target on the ``news`` calibration split with KV off, and the second on ``code``. The
int4 tier saves few bits here: the old stack with KV off saved 26.2% of bit-weighted FLOPs
on ``news``, the int8 stack with a 3,072-key window (2.2% of FLOPs from KV) 28.0%. Position-window KV skipping whose sinks + recent window covers the context drops
no key: a KV-only candidate is not run there (*idle*), and a stack's cell is measured with
its KV part off (*kv idle*; ``calibrate.acting_config``). Writes
docs/results/preset_candidates.md (and .json). Usage:

    python benchmarks/preset_candidates.py [--presets kvskip all] [--windows 4096 512] [--corpora code wiki news pydoc]
                                           [--journal-only] [--out docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.calibrate import DEFAULT_MARGIN, acting_config, split_runner  # noqa: E402
from quicksilver.config import AMQ, HALTING, PRESET_INFO, Config  # noqa: E402
from quicksilver.corpora import OFFLINE_CORPORA  # noqa: E402
from quicksilver.models import bos_per_window  # noqa: E402
from quicksilver.results_io import write_atomic, write_json_atomic  # noqa: E402

MODEL = "smollm2-135m"
WINDOWS = (3072, 2048, 1536, 1024)  # recent keys, mildest first; 1,024 was the preset that failed on code
# AMQ as the ``fast`` preset runs it: int8 per output channel everywhere, the LM head included (no int4 tier).
INT8 = {"enabled": True, "uniform_bits": 8, "head_bits": 8}
# AMQ's own int8 tier: group-32 int8 for every token (the int4 tier off; calibrate's mildest AMQ level).
INT8_G32 = {**AMQ, "int4_below": 0.0}
# What a preset saves: KV skipping saves FLOPs; ``all`` also quantizes, which saves bits, not FLOPs.
SAVING = {"kvskip": "flops", "all": "bit_flops"}


def kv(window: int) -> dict:
    return {"enabled": True, "policy": "propagate", "sink_tokens": 4, "recent_window": window}


def candidates() -> dict[str, list[list[tuple[str, Config]]]]:
    """Per preset, chains of candidates, each from mildest to most aggressive."""
    return {
        "kvskip": [[(f"sinks 4 + recent {w}", Config.from_dict({"kv": kv(w)})) for w in WINDOWS]],
        "all": [
            # The stack as it was (AMQ with its int4 tier below drift 0.15), with KV off and then windowed.
            [("halting + amq (kv off)", Config.from_dict({"halting": HALTING, "amq": AMQ}))]
            + [(f"halting + amq + sinks 4 + recent {w}", Config.from_dict({"halting": HALTING, "amq": AMQ, "kv": kv(w)}))
               for w in WINDOWS[:2]],
            # Int8 only, as ``fast`` runs it (per output channel, the LM head too).
            [(f"halting + int8 + sinks 4 + recent {w}", Config.from_dict({"halting": HALTING, "amq": INT8, "kv": kv(w)}))
             for w in WINDOWS[:2]],
            # AMQ's own int8 tier alone (group 32).
            [(f"halting + int8 g32 + sinks 4 + recent {w}", Config.from_dict({"halting": HALTING, "amq": INT8_G32, "kv": kv(w)}))
             for w in WINDOWS[:2]],
            # Measured only if every chain above broke: the stack without halting.
            [(f"int8 g32 + sinks 4 + recent {w}", Config.from_dict({"amq": INT8_G32, "kv": kv(w)})) for w in WINDOWS[:2]],
        ],
    }


def effective(config: Config, window: int) -> Config:
    """The config as it acts at ``window`` tokens (see ``calibrate.acting_config``)."""
    return acting_config(config, window)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["kvskip", "all"], choices=list(candidates()))
    ap.add_argument("--windows", type=int, nargs="+", default=[4096, 512])
    ap.add_argument("--corpora", nargs="+", default=["code", "wiki", "news", "pydoc"],
                    help="calibration splits, in the order they are measured (the likely binding one first)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--journal-only", action="store_true", help="measure nothing: tabulate what the journal holds")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    unknown = [c for c in args.corpora if c not in OFFLINE_CORPORA]
    if unknown:
        sys.exit(f"error: unknown corpus {', '.join(unknown)} (offline: {', '.join(OFFLINE_CORPORA)})")
    out = Path(args.out)
    journal = out / "calibrated" / "trials.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    hf_model, tokenizer = load_model(MODEL)
    bos = bos_per_window(MODEL, tokenizer)
    dev = next(hf_model.parameters()).device
    runners = {}

    def runner(corpus, window):
        if (corpus, window) not in runners:
            runners[corpus, window] = split_runner(hf_model, tokenizer, MODEL, corpus, "calibration", window, args.max_tokens, bos,
                                                   dev, journal, read_only=args.journal_only)
        return runners[corpus, window]

    rows = []
    for preset in args.presets:
        target = PRESET_INFO[preset].budget * (1 - DEFAULT_MARGIN)
        chains = candidates()[preset]
        for i, chain in enumerate(chains):
            if preset == "all" and i == len(chains) - 1 and chosen(rows, args.corpora, args.windows).get(preset):
                break  # the fallback chain (no halting) only when every other chain broke
            for label, config in chain:
                if measure_candidate(preset, label, config, target, args, runner, rows):
                    break  # a harsher candidate of this chain would cost more still
    meta = run_meta(dtype=str(hf_model.dtype).removeprefix("torch."), margin=DEFAULT_MARGIN)
    write_json_atomic(out / "preset_candidates.json", {"meta": meta, "rows": rows})
    write_atomic(out / "preset_candidates.md", markdown(rows, meta, args))


def measure_candidate(preset: str, label: str, config: Config, target: float, args, runner, rows: list[dict]) -> bool:
    """Measure one candidate cell by cell (the likely binding corpus first); True if it breaks the target."""
    for window in args.windows:
        for corpus in args.corpora:
            row = {"preset": preset, "candidate": label, "config": config.to_dict(), "corpus": corpus, "window": window,
                   "target": target}
            acting = effective(config, window)
            if acting.is_off:
                rows.append({**row, "idle": True, "relative_delta_perplexity": 0.0, "flop_reduction": 0.0})
                continue
            row["kv_idle"] = acting is not config
            r = runner(corpus, window)
            t0 = time.time()
            trial = r.known(acting) if args.journal_only else r.measure(acting)
            if trial is None:
                rows.append({**row, "not_run": True})
                continue
            delta = r.cost(trial)
            rows.append({**row, "idle": False, "relative_delta_perplexity": delta, "flop_reduction": r.gain(trial),
                         "flops": trial.flops, "bit_flops": trial.bit_flops, "baseline_flops": r.baseline.flops})
            print(f"{preset} [{label}] {corpus} {window}: {delta * 100:+.2f}% (target {target * 100:g}%), "
                  f"FLOPs {-r.gain(trial) * 100:+.1f}%, bit-weighted {-(1 - trial.bit_flops / r.baseline.flops) * 100:+.1f}% "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
            if delta > target:
                return True
    return False


def verdicts(rows: list[dict], corpora: list[str], windows: list[int]) -> dict[tuple[str, str], str]:
    """Per (preset, candidate): fits (every cell measured and within target), breaks, or incomplete."""
    out = {}
    for key in dict.fromkeys((r["preset"], r["candidate"]) for r in rows):
        cells = {(r["corpus"], r["window"]): r for r in rows if (r["preset"], r["candidate"]) == key}
        if any(not c.get("not_run") and c["relative_delta_perplexity"] > c["target"] for c in cells.values()):
            out[key] = "breaks"
        elif all((c, w) in cells and not cells[c, w].get("not_run") for c in corpora for w in windows):
            out[key] = "fits"
        else:
            out[key] = "incomplete"
    return out


def chosen(rows: list[dict], corpora: list[str], windows: list[int]) -> dict[str, str]:
    """Per preset, the fitting candidate with the largest pooled saving (``SAVING``) at the longest window."""
    fit = verdicts(rows, corpora, windows)
    best = {}
    for (preset, label), verdict in fit.items():
        if verdict != "fits":
            continue
        cells = [r for r in rows if (r["preset"], r["candidate"]) == (preset, label) and r["window"] == max(windows) and not r["idle"]]
        saving = 1 - sum(r[SAVING[preset]] for r in cells) / sum(r["baseline_flops"] for r in cells) if cells else 0.0
        if preset not in best or saving > best[preset][1]:
            best[preset] = (label, saving)
    return {p: label for p, (label, _) in best.items()}


def markdown(rows: list[dict], meta: dict, args) -> str:
    corpora, windows = args.corpora, sorted(args.windows)
    fit, pick = verdicts(rows, corpora, windows), chosen(rows, corpora, windows)
    cells = {(r["preset"], r["candidate"], r["corpus"], r["window"]): r for r in rows}
    lines = [
        header(meta) + "; "
        + f"smollm2-135m {meta['dtype']}, the stock model in the same dtype on the same windows. **Calibration** splits only "
        f"(first {args.max_tokens} tokens of each); no test split is read. Cell: relative perplexity increase; below it the "
        f"change in FLOPs executed. A candidate fits when its worst cell stays within the preset's budget x "
        f"{1 - meta['margin']:g} (margin {meta['margin']:g}); the preset takes the fitting candidate that saves the most at "
        f"{max(windows)} tokens, pooled (FLOPs for `kvskip`; bit-weighted FLOPs, *bits*, for `all`, whose AMQ saves bits). "
        f"Candidates go in chains, mildest first; one stops at its first cell over the target, and a chain at its first "
        f"candidate that breaks (*skipped*: not measured for that reason). *idle*: KV skipping alone "
        f"with sinks + recent window covering the context (no key dropped; not run); *kv idle*: the same for the KV part of "
        f"a stack, measured with KV off (the same attention).",
        "",
        "| preset | target | candidate | " + " | ".join(f"{c} {w}" for c in corpora for w in windows) + " | verdict |",
        "|---|---|---|" + "---|" * (len(corpora) * len(windows)) + "---|",
    ]
    for (preset, label), verdict in fit.items():
        target = next(r["target"] for r in rows if r["preset"] == preset)
        row = []
        for c in corpora:
            for w in windows:
                r = cells.get((preset, label, c, w))
                if r is None:
                    row.append("skipped")
                elif r.get("not_run"):
                    row.append("not run")
                elif r["idle"]:
                    row.append("idle")
                else:
                    over = " **over**" if r["relative_delta_perplexity"] > target else ""
                    note = " (kv idle)" if r.get("kv_idle") else ""
                    bits = f", bits {-(1 - r['bit_flops'] / r['baseline_flops']) * 100:+.1f}%" if preset == "all" else ""
                    row.append(f"{r['relative_delta_perplexity'] * 100:+.2f}%{over}{note}<br>FLOPs {-r['flop_reduction'] * 100:+.1f}%{bits}")
        mark = " (**chosen**)" if pick.get(preset) == label else ""
        lines.append(f"| {preset} | {target * 100:g}% | {label} | " + " | ".join(row) + f" | {verdict}{mark} |")
    none = [p for p in args.presets if p not in pick]
    if none:
        lines += ["", "No candidate fits for: " + ", ".join(f"`{p}`" for p in none) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
