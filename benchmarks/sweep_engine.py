"""Sweep halting and KV-skipping variants on the default model; write tables for docs/RESULTS.md.

Every row is measured against the stock HF model on the same windows in the same run: the stock
model runs and is timed once per window plan, in the plan's first row, and every row compares
against it (quicksilver.evaluate.BaselineCache). Usage:

    python benchmarks/sweep_engine.py [--tokens 8192] [--out docs/results]

Writes ``engine_sweep.json`` and ``engine_sweep.md`` (a markdown table per sweep).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.config import PRESETS, Config  # noqa: E402
from quicksilver.evaluate import BaselineCache, evaluate_model  # noqa: E402
from quicksilver.results_io import write_atomic, write_json_atomic  # noqa: E402


def halting_variants() -> list[tuple[str, dict]]:
    """Every halting variant we tried, in the order of the search (see RESULTS.md for why)."""
    v = []
    # The paper's literal design: a halted token exits straight to the head.
    v.append(("exit to head (tail 0), thr 0.2, patience 2", {"threshold": 0.2, "min_layer": 8, "patience": 2, "tail_layers": 0, "skip": "layer"}))
    # SkipDecode-style: halted tokens skip the middle, the last layers run for everyone.
    v.append(("skip layer, tail 2, thr 0.2, patience 2", {"threshold": 0.2, "min_layer": 4, "patience": 2, "tail_layers": 2, "skip": "layer"}))
    # MLP-only skipping: halted tokens still attend and write K/V.
    for thr in (0.2, 0.1):
        v.append((f"skip mlp, tail 2, thr {thr}, patience 2", {"threshold": thr, "min_layer": 4, "patience": 2, "tail_layers": 2, "skip": "mlp"}))
    v.append(("cosine 0.01, skip mlp, tail 2, patience 2", {"signal": "cosine", "threshold": 0.01, "min_layer": 4, "patience": 2, "tail_layers": 2, "skip": "mlp"}))
    for thr in (0.13, 0.16):
        v.append((f"skip mlp, tail 5, min layer 10, thr {thr}, patience 3", {"threshold": thr, "min_layer": 10, "patience": 3, "tail_layers": 5, "skip": "mlp"}))
    # Halted tokens skip only the MLPs that cost least when skipped (layers 11, 12, 17; single-layer scan).
    for thr in (0.2, 0.25):
        v.append((f"skip mlp of layers 11,12,17 only, thr {thr}, patience 1",
                  {"threshold": thr, "min_layer": 4, "patience": 1, "tail_layers": 2, "skip": "mlp", "skippable_layers": [11, 12, 17]}))
    # Static depth reduction (every token from position 4 skips the MLP of layer 12): the matched baseline.
    v.append(("static: every token skips MLP 12", {"threshold": 2.0, "min_layer": 2, "patience": 1, "tail_layers": 2, "skip": "mlp", "skippable_layers": [12]}))
    return [(name, {"halting": {"enabled": True, **s}}) for name, s in v]


def kv_variants() -> list[tuple[str, dict]]:
    v = []
    for w in (2048, 1024, 512, 256):
        v.append((f"sinks 4 + recent {w}", {"kv": {"enabled": True, "sink_tokens": 4, "recent_window": w}}))
    v.append(("recent 512 from layer 2 (first 2 layers full)", {"kv": {"enabled": True, "sink_tokens": 4, "recent_window": 512, "layers_from": 2}}))
    return v


COLUMNS = ("perplexity", "relative_delta_perplexity", "flop_reduction", "speedup", "mean_exit_layer", "kv_fraction", "top1_agreement")


def ablation_rows() -> list[tuple[str, dict]]:
    """The paper's ablation: each mechanism alone, the cumulative stack, and uniform baselines."""
    P = PRESETS
    return [
        ("Dynamic Token Halting alone", P["halting"]),
        ("KV Cache Skipping alone", P["kvskip"]),
        ("Contextual Token Fusion alone", P["fusion"]),
        ("Adaptive Matryoshka Quantization alone", P["amq"]),
        ("halting + KV skipping", {**P["halting"], **P["kvskip"]}),
        ("halting + KV skipping + fusion", {**P["halting"], **P["kvskip"], **P["fusion"]}),
        ("halting + KV skipping + AMQ (all; fusion left out)", P["all"]),
        ("uniform int8 (real int8 kernel)", P["int8"]),
        ("uniform int4 (MSB slice, group 32; no fast kernel)", P["int4"]),
    ]


def row(name: str, r: dict) -> dict:
    ledger = r["ledger"]
    return {
        "variant": name, **{k: r[k] for k in COLUMNS}, "baseline_perplexity": r["baseline"]["perplexity"],
        "bit_flop_reduction": 1.0 - ledger["bit_weighted_flops"] / r["baseline"]["flops"],
        "bits_per_token": ledger["bits_per_token"], "fused_fraction": ledger["fused_fraction"], "config": r["config"],
    }


def ablation_markdown(title: str, rows: list[dict], baseline_ppl: float) -> str:
    lines = [f"#### {title}", "",
             "| configuration | PPL | rel. ΔPPL | FLOP reduction | bit-weighted FLOP reduction | speedup | kv_fraction | bits/token | fused |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| baseline (stock HF, float32) | {baseline_ppl:.3f} | — | — | — | 1.00x | 1.000 | 32 (float32) | 0 |"]
    for r in rows:
        bits = f"{r['bits_per_token']:.2f}" if r["bits_per_token"] != 16 else "unquantized"
        lines.append(
            f"| {r['variant']} | {r['perplexity']:.3f} | {r['relative_delta_perplexity'] * 100:+.2f}% | {r['flop_reduction'] * 100:.1f}% "
            f"| {r['bit_flop_reduction'] * 100:.1f}% | {r['speedup']:.2f}x | {r['kv_fraction']:.3f} | {bits} | {r['fused_fraction'] * 100:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def markdown(title: str, rows: list[dict], baseline_ppl: float) -> str:
    lines = [f"#### {title}", "", f"Baseline perplexity {baseline_ppl:.3f}.", "",
             "| variant | PPL | rel. ΔPPL | FLOP reduction | speedup | mean exit layer | kv_fraction | top-1 agree |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['perplexity']:.3f} | {r['relative_delta_perplexity'] * 100:+.2f}% | {r['flop_reduction'] * 100:.1f}% "
            f"| {r['speedup']:.2f}x | {r['mean_exit_layer']:.1f} | {r['kv_fraction']:.3f} | {r['top1_agreement'] * 100:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--only", choices=["halting", "kv", "ablation"], default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/notes/gpu.py)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default="smollm2-135m", help="offline name, .gguf file, folder or hub id")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    sweeps = []
    plan = []
    if args.only in (None, "halting"):
        plan.append(("halting", 1024, halting_variants()))
    if args.only in (None, "kv"):
        plan += [("kv", 1024, kv_variants()[1:4]), ("kv", 4096, kv_variants())]
    if args.only in (None, "ablation"):
        plan.append(("ablation", 4096, ablation_rows()))
    baseline = BaselineCache()  # the stock model runs and is timed once per window plan, in its first row
    for kind, window, variants in plan:
        rows = []
        for name, data in variants:
            t0 = time.time()
            r = evaluate_model(args.model, args.corpus, max_tokens=args.tokens, window=window,
                               config=Config.from_dict({**data, "name": name}), loaded=loaded, device=args.device,
                               baseline_cache=baseline)
            rows.append(row(name, r))
            print(f"[{kind} w={window}] {name}: rel {r['relative_delta_perplexity'] * 100:+.2f}% "
                  f"flops -{r['flop_reduction'] * 100:.1f}% speedup {r['speedup']:.2f} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        sweeps.append({"kind": kind, "window": window, "rows": rows})
    meta = run_meta(args.device, tokens=args.tokens, corpus=args.corpus)
    head = header(meta, f"model {args.model} {args.dtype}, `{args.corpus}` test split, first {args.tokens} tokens.")
    stem = ("engine_sweep" if args.only is None else f"engine_sweep_{args.only}") + ("" if args.corpus == "wiki" else f"_{args.corpus}")
    write_json_atomic(out / f"{stem}.json", {"meta": meta, "sweeps": sweeps})
    names = {"halting": "Dynamic Token Halting", "kv": "KV Cache Skipping"}
    for kind in ("halting", "kv", "ablation"):
        chosen = [s for s in sweeps if s["kind"] == kind]
        if not chosen:
            continue
        md = [head, ""]
        for s in chosen:
            base = s["rows"][0]["baseline_perplexity"]
            # fewer tokens than the window: the rows ran over one window of those tokens, not windows of the plan's size
            span = (f"one {args.tokens}-token window (the plan's {s['window']}-token windows)" if args.tokens and args.tokens < s["window"]
                    else f"{s['window']}-token windows")
            if kind == "ablation":
                md.append(ablation_markdown(f"Ablation, `{args.corpus}` test split, {span}", s["rows"], base))
            else:
                md.append(markdown(f"{names[kind]}, {span}", s["rows"], base))
        write_atomic(out / f"sweep_{kind}{'' if args.corpus == 'wiki' else '_' + args.corpus}.md", "\n".join(md))


if __name__ == "__main__":
    main()
