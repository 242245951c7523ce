"""Decode benchmark: each preset against HF ``generate`` on the same prompts, in the same run.

For batch sizes 1 and 8 and 128 new tokens on 8 prompts from the wiki test split:
tokens/s of each side and their ratio (same dtype; and against HF in float32), time to first token, KV-cache bytes (the engine's
peak against the full cache HF keeps), and greedy agreement with HF's greedy output
(fraction of identical tokens, and the first step where they differ). HF and the engine
alternate prompt by prompt after a warm-up. EOS does not stop either side, so both
produce exactly ``--new-tokens`` tokens. Usage:

    python benchmarks/bench_decode.py [--new-tokens 128] [--out docs/results] [--dtype auto] [--threads N]
        [--presets off,fast] [--batches 1,8] [--steps eager,compiled] [--merge]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from quicksilver import load_corpus, load_model
from quicksilver.config import PRESETS, Config
from quicksilver.engine import Engine
from quicksilver.evaluate import make_engine
from quicksilver.hardware import describe
from quicksilver.models import parse_dtype
from quicksilver.results_io import write_atomic, write_json_atomic


def prompts_from_corpus(tok, n: int = 8) -> list[list[int]]:
    """The opening paragraph of n test articles, cut to 24..64 tokens (varied lengths)."""
    out = []
    for i, doc in enumerate(load_corpus("wiki", "test").documents[:n]):
        ids = tok(doc.split("\n\n", 2)[1], add_special_tokens=False).input_ids
        out.append(ids[: 24 + (i * 5) % 41])
    return out


def hf_generate(model, tok, prompts: list[list[int]], new_tokens: int):
    """HF greedy generate on a left-padded batch; returns (tokens per row, seconds, ttft seconds)."""
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev = model.device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=pad, eos_token_id=None)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kw)
    _sync(dev)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    _sync(dev)
    seconds = time.perf_counter() - t0
    return out[:, width:].tolist(), seconds, ttft


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(ours: list[list[int]], ref: list[list[int]]) -> tuple[float, int | None]:
    same = total = 0
    first = None
    for a, b in zip(ours, ref):
        for step, (x, y) in enumerate(zip(a, b)):
            same += x == y
            total += 1
            if x != y and (first is None or step < first):
                first = step
    return same / max(total, 1), first


def run_preset(model, tok, name: str, groups, new_tokens: int, step: str = "eager") -> dict | None:
    """One preset against HF ``generate`` on the same model, alternating group by group.

    ``step``: ``eager`` runs the engine's layer loop op by op, ``compiled`` its compiled decode
    step (``quicksilver.compiled``, compiled during the warm-up, outside the timing).
    """
    os.environ["QUICKSILVER_COMPILE"] = "1" if step == "compiled" else "0"
    engine = make_engine(model, tok, Config.preset(name))
    if step == "compiled" and engine._step_key is None:
        return None  # the compiled step does not apply to this preset's mechanisms
    t0 = time.perf_counter()
    engine.generate([torch.tensor(p) for p in groups[0]], 4)  # warm-up (kernel choice; compiling)
    warm_s = time.perf_counter() - t0
    hf_tokens, hf_s, hf_ttft, qs_tokens, qs_s, qs_ttft, kv, kv_full = [], 0.0, 0.0, [], 0.0, 0.0, 0, 0
    for group in groups:
        toks, s, ttft = hf_generate(model, tok, group, new_tokens)
        hf_tokens += toks
        hf_s += s
        hf_ttft += ttft
        r = engine.generate([torch.tensor(p) for p in group], new_tokens)
        qs_tokens += r.tokens
        qs_s += r.total_seconds
        qs_ttft += r.time_to_first_token
        kv += r.kv_bytes
        kv_full += r.kv_full_bytes
    n = sum(len(t) for t in qs_tokens)
    agree, first = agreement(qs_tokens, hf_tokens)
    row = {
        "preset": name, "dtype": str(model.dtype).removeprefix("torch."), "batch": len(groups[0]), "new_tokens": n,
        "hf_tokens_per_s": sum(len(t) for t in hf_tokens) / hf_s, "tokens_per_s": n / qs_s,
        "hf_ttft_ms": 1000 * hf_ttft / len(groups), "ttft_ms": 1000 * qs_ttft / len(groups),
        "kv_bytes": kv, "kv_full_bytes": kv_full, "greedy_agreement": agree, "first_divergence": first,
        "step": step, "warm_up_s": warm_s,
    }
    row["speed_ratio"] = row["tokens_per_s"] / row["hf_tokens_per_s"]
    return row


def hf_rate(model, tok, groups, new_tokens: int) -> float:
    """HF ``generate`` tokens/s over the groups (the float32 reference a default user gets)."""
    hf_generate(model, tok, groups[0], 4)
    n = s = 0
    for group in groups:
        toks, secs, _ = hf_generate(model, tok, group, new_tokens)
        n += sum(len(t) for t in toks)
        s += secs
    return n / s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--presets", default="off,fast," + ",".join(p for p in PRESETS if p not in ("off", "fast")))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu.py)")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 where native), float32, bfloat16")
    ap.add_argument("--model", default="smollm2-135m", help="offline name, .gguf file, folder or hub id")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--steps", default="eager,compiled",
                    help="the engine's decode step: eager, compiled (where it applies), or both")
    ap.add_argument("--skip-float32-check", action="store_true",
                    help="leave out the float32 `off` rows (the equality check; kept from an earlier run with --merge)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an earlier decode.json that this run does not measure again")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = round(os.getloadavg()[0], 2)
    dtype = parse_dtype(args.dtype, args.device)
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    model.generation_config.eos_token_id = None  # both sides generate exactly --new-tokens tokens
    model32 = None
    if dtype != torch.float32:  # the float32 stock model: what a user gets by default, and the equality check
        model32, _ = load_model(args.model, dtype="float32", device=args.device)
        model32.generation_config.eos_token_id = None
    prompts = prompts_from_corpus(tok)
    spec = Engine(model).spec
    rows = []
    for batch in map(int, args.batches.split(",")):
        groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        hf_generate(model, tok, groups[0], 4)  # warm-up
        hf32 = hf_rate(model32, tok, groups, args.new_tokens) if model32 is not None else None
        runs = [(model, name) for name in args.presets.split(",")]
        if model32 is not None and not args.skip_float32_check:
            runs.append((model32, "off"))  # off == stock, token for token, checked in float32
        steps = args.steps.split(",")
        for m, name, step in [(m, name, step) for m, name in runs for step in steps]:
            row = run_preset(m, tok, name, groups, args.new_tokens, step)
            if row is None:
                continue
            row["vs_hf_float32"] = row["tokens_per_s"] / (hf32 if hf32 is not None else row["hf_tokens_per_s"])
            rows.append(row)
            print(f"batch {batch} {name} {row['dtype']} {step}: {row['tokens_per_s']:.1f} tok/s vs HF {row['hf_tokens_per_s']:.1f} "
                  f"({row['speed_ratio']:.2f}x; {row['vs_hf_float32']:.2f}x HF float32), agreement {row['greedy_agreement']:.1%}, "
                  f"first divergence {row['first_divergence']}", file=sys.stderr, flush=True)
    meta = {
        "command": "python benchmarks/bench_decode.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe(args.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "n_layers": spec.n_layers, "load_average_at_start": load_at_start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = [meta["command"]]
    if args.merge and (out / "decode.json").is_file():
        import json

        old = json.loads((out / "decode.json").read_text())
        ident = lambda r: (r["batch"], r["preset"], r["dtype"], r.get("step", "eager"))  # noqa: E731
        mine = {ident(r) for r in rows}
        rows = [r for r in old["rows"] if ident(r) not in mine] + rows
        rows.sort(key=lambda r: (r["batch"], r["dtype"] != str(model.dtype).removeprefix("torch."), r["preset"] != "off",
                                 r["preset"], r.get("step", "eager") != "eager"))
        commands = old["meta"].get("commands", [old["meta"]["command"]]) + commands
    meta["commands"] = commands
    write_json_atomic(out / "decode.json", {"meta": meta, "rows": rows})
    lines = [f"Command: {' + '.join(f'`{c}`' for c in commands)} — {meta['date']} — {meta['machine']} — torch {meta['torch']}; "
             f"{args.model}, 8 wiki prompts of 24-64 tokens, {args.new_tokens} new tokens each, greedy. "
             "`ratio`: against HF `generate` on the same model in the same dtype, same run; `vs HF fp32`: against "
             "HF `generate` in float32 (what a user gets without choosing a dtype). Agreement is with HF's greedy "
             "tokens in the row's own dtype. `step`: the engine's layer loop op by op (`eager`) or its compiled "
             "decode step (`compiled`, `quicksilver.compiled`; `warm-up s` includes compiling it). "
             f"Load average at start: {meta['load_average_at_start']}.", "",
             "| batch | preset | dtype | step | tok/s | HF tok/s | ratio | vs HF fp32 | TTFT ms | HF TTFT ms | KV bytes vs full "
             "| greedy agreement | first divergence | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['preset']} | {r['dtype']} | {r.get('step', 'eager')} | {r['tokens_per_s']:.1f} | {r['hf_tokens_per_s']:.1f} "
                     f"| {r['speed_ratio']:.2f}x | {r['vs_hf_float32']:.2f}x "
                     f"| {r['ttft_ms']:.0f} | {r['hf_ttft_ms']:.0f} | {r['kv_bytes'] / max(r['kv_full_bytes'], 1):.1%} "
                     f"| {r['greedy_agreement']:.1%} | {r['first_divergence'] if r['first_divergence'] is not None else 'none'} "
                     f"| {r.get('warm_up_s', float('nan')):.1f} |")
    write_atomic(out / "decode.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
