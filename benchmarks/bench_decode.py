"""Decode benchmark: each preset against HF ``generate`` on the same prompts, in the same run.

For batch sizes 1 and 8 and 128 new tokens on 8 prompts from the wiki test split:
tokens/s of each side and their ratio (same dtype; and against HF in float32), time to first token, KV-cache bytes (the engine's
peak against the full cache HF keeps), and greedy agreement with HF's greedy output
(fraction of identical tokens, and the first step where they differ). HF and the engine
alternate group by group after a warm-up, and which of them runs first alternates too
(``harness.interleaved``). EOS does not stop either side, so both
produce exactly ``--new-tokens`` tokens. Usage:

    python benchmarks/bench_decode.py [--new-tokens 128] [--out docs/results] [--dtype auto] [--threads N]
        [--presets off,fast] [--batches 1,8] [--steps eager,compiled] [--merge]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (greedy_agreement, header, hf_generate, interleaved, load_results, merge_meta, merge_rows,  # noqa: E402
                     pad_id, run_meta, timed, wiki_prompts, write_results)
from quicksilver import compiled, generate, native_decode  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.config import PRESETS, Config  # noqa: E402
from quicksilver.engine import Engine  # noqa: E402
from quicksilver.evaluate import make_engine  # noqa: E402
from quicksilver.models import parse_dtype  # noqa: E402

PROMPT_LENGTHS = [24 + (i * 5) % 41 for i in range(8)]  # 24..59 tokens: varied lengths


def hf_side(model, tok, new_tokens: int):
    """HF ``generate`` on one group: (tokens per row, seconds, time to first token)."""
    pad = pad_id(tok)

    def run(group):
        ttft = timed(lambda: hf_generate(model, group, 1, pad))[1]
        tokens, seconds = hf_generate(model, group, new_tokens, pad)
        return tokens, seconds, ttft

    return run


def run_preset(model, tok, name: str, groups, new_tokens: int, step: str = "eager", hf_runs: dict | None = None) -> dict | None:
    """One preset against HF ``generate`` on the same model, alternating group by group.

    ``step``: ``eager`` runs the engine's layer loop op by op, ``compiled`` its compiled decode
    step (``quicksilver.compiled``, compiled during the warm-up, outside the timing).
    ``hf_runs``: HF's runs per (model, batch), shared by the rows of one run (``--hf-once``): HF
    runs, interleaved, with the first row of each model and batch only; later rows reuse them.
    """
    os.environ["QUICKSILVER_COMPILE"] = "1" if step == "compiled" else "0"
    engine = make_engine(model, tok, Config.preset(name))
    if step == "compiled" and compiled.structure(engine) is None:
        return None  # the compiled step does not apply to this preset's mechanisms
    t0 = time.perf_counter()
    generate(engine, [torch.tensor(p) for p in groups[0]], 4)  # warm-up (kernel choice; compiling)
    warm_s = time.perf_counter() - t0
    key = (id(model), len(groups[0]))
    sides = {"engine": lambda group: generate(engine, [torch.tensor(p) for p in group], new_tokens)}
    if hf_runs is None or key not in hf_runs:
        sides = {"hf": hf_side(model, tok, new_tokens)} | sides
    runs = interleaved(sides, groups)
    if hf_runs is not None:
        runs["hf"] = hf_runs.setdefault(key, runs.get("hf"))
    hf_tokens = [t for toks, _, _ in runs["hf"] for t in toks]
    hf_s, hf_ttft = sum(s for _, s, _ in runs["hf"]), sum(t for _, _, t in runs["hf"])
    qs_tokens = [t for r in runs["engine"] for t in r.tokens]
    qs_s, qs_ttft = sum(r.total_seconds for r in runs["engine"]), sum(r.time_to_first_token for r in runs["engine"])
    kv, kv_full = sum(r.kv_bytes for r in runs["engine"]), sum(r.kv_full_bytes for r in runs["engine"])
    n = sum(len(t) for t in qs_tokens)
    agree, first = greedy_agreement(qs_tokens, hf_tokens)
    row = {
        "preset": name, "dtype": str(model.dtype).removeprefix("torch."), "batch": len(groups[0]), "new_tokens": n,
        "hf_tokens_per_s": sum(len(t) for t in hf_tokens) / hf_s, "tokens_per_s": n / qs_s,
        "hf_ttft_ms": 1000 * hf_ttft / len(groups), "ttft_ms": 1000 * qs_ttft / len(groups),
        "kv_bytes": kv, "kv_full_bytes": kv_full, "greedy_agreement": agree, "first_divergence": first,
        # With compile off the decoding core still takes the native step where it applies and measured faster: say so.
        "step": "native" if step == "eager" and native_decode.native_step(engine) is not None and native_decode.pays(engine, len(groups[0]))
        else step, "warm_up_s": warm_s,
    }
    row["speed_ratio"] = row["tokens_per_s"] / row["hf_tokens_per_s"]
    return row


def hf_rate(model, tok, groups, new_tokens: int) -> float:
    """HF ``generate`` tokens/s over the groups (the float32 reference a default user gets)."""
    hf_generate(model, groups[0], 4, pad_id(tok))
    runs = [hf_generate(model, group, new_tokens, pad_id(tok)) for group in groups]
    return sum(len(t) for toks, _ in runs for t in toks) / sum(s for _, s in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--presets", default="off,fast," + ",".join(p for p in PRESETS if p not in ("off", "fast")))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/notes/gpu.py)")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 where native), float32, bfloat16")
    ap.add_argument("--model", default="smollm2-135m", help="offline name, .gguf file, folder or hub id")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--steps", default="eager,compiled",
                    help="the engine's decode step: eager, compiled (where it applies), or both")
    ap.add_argument("--skip-float32-check", action="store_true",
                    help="leave out the float32 `off` rows (the equality check; kept from an earlier run with --merge)")
    ap.add_argument("--hf-once", action="store_true",
                    help="time HF generate once per model and batch (with the first preset, interleaved), not beside every row")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an earlier decode.json that this run does not measure again")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = run_meta(args.device)
    dtype = parse_dtype(args.dtype, args.device)
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    model.generation_config.eos_token_id = None  # both sides generate exactly --new-tokens tokens
    model32 = None
    if dtype != torch.float32:  # the float32 stock model: what a user gets by default, and the equality check
        model32, _ = load_model(args.model, dtype="float32", device=args.device)
        model32.generation_config.eos_token_id = None
    prompts = wiki_prompts(tok, PROMPT_LENGTHS)
    spec = Engine(model).spec
    rows = []
    hf_runs = {} if args.hf_once else None
    for batch in map(int, args.batches.split(",")):
        groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        hf_generate(model, groups[0], 4, pad_id(tok))  # warm-up
        hf32 = hf_rate(model32, tok, groups, args.new_tokens) if model32 is not None else None
        runs = [(model, name) for name in args.presets.split(",")]
        if model32 is not None and not args.skip_float32_check:
            runs.append((model32, "off"))  # off == stock, token for token, checked in float32
        steps = args.steps.split(",")
        for m, name, step in [(m, name, step) for m, name in runs for step in steps]:
            row = run_preset(m, tok, name, groups, args.new_tokens, step, hf_runs)
            if row is None:
                continue
            row["vs_hf_float32"] = row["tokens_per_s"] / (hf32 if hf32 is not None else row["hf_tokens_per_s"])
            rows.append(row)
            print(f"batch {batch} {name} {row['dtype']} {step}: {row['tokens_per_s']:.1f} tok/s vs HF {row['hf_tokens_per_s']:.1f} "
                  f"({row['speed_ratio']:.2f}x; {row['vs_hf_float32']:.2f}x HF float32), agreement {row['greedy_agreement']:.1%}, "
                  f"first divergence {row['first_divergence']}", file=sys.stderr, flush=True)
    meta["n_layers"] = spec.n_layers
    out = Path(args.out)
    old = load_results(out / "decode.json") if args.merge else {}
    if old:
        ident = lambda r: (r["batch"], r["preset"], r["dtype"], r.get("step", "eager"))  # noqa: E731
        rows = merge_rows(old["rows"], rows, ident)
        rows.sort(key=lambda r: (r["batch"], r["dtype"] != str(model.dtype).removeprefix("torch."), r["preset"] != "off",
                                 r["preset"], r.get("step", "eager") != "eager"))
        meta = merge_meta(old["meta"], meta)
    what = (f"{args.model}, 8 wiki prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.new_tokens} new "
            "tokens each, greedy. `ratio`: against HF `generate` on the same model in the same dtype, same run ("
            + ("HF timed once per model and batch, alternating group by group with the first preset's engine; later rows "
               "reuse that time" if args.hf_once else
               "HF and the engine alternate group by group, which of them runs first alternating too")
            + "); `vs HF fp32`: against "
            "HF `generate` in float32 (what a user gets without choosing a dtype). Agreement is with HF's greedy "
            "tokens in the row's own dtype. `step`: the engine's layer loop op by op (`eager`), the native decode step "
            "the decoding core takes with compile off where it applies and measured faster (`native`, quicksilver.native_decode), "
            "or its compiled decode step (`compiled`, `quicksilver.compiled`; `warm-up s` includes compiling it). "
            f"Load average at start: {meta['load_average']}.")
    lines = [header(meta, what), "",
             "| batch | preset | dtype | step | tok/s | HF tok/s | ratio | vs HF fp32 | TTFT ms | HF TTFT ms | KV bytes vs full "
             "| greedy agreement | first divergence | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['preset']} | {r['dtype']} | {r.get('step', 'eager')} | {r['tokens_per_s']:.1f} | {r['hf_tokens_per_s']:.1f} "
                     f"| {r['speed_ratio']:.2f}x | {r['vs_hf_float32']:.2f}x "
                     f"| {r['ttft_ms']:.0f} | {r['hf_ttft_ms']:.0f} | {r['kv_bytes'] / max(r['kv_full_bytes'], 1):.1%} "
                     f"| {r['greedy_agreement']:.1%} | {r['first_divergence'] if r['first_divergence'] is not None else 'none'} "
                     f"| {r.get('warm_up_s', float('nan')):.1f} |")
    write_results(out, "decode", {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
