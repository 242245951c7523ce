"""Long context: pass-key retrieval and continuation perplexity at kept fractions of the KV cache.

The window policy (sinks + recent window, sized to the kept fraction) against the importance
rules of ``kv.selection``, on the same needles and the same continuation chunks, with the
stock model run once per trial or chunk and reused for every configuration. Results
accumulate in one JSON file (written atomically after each configuration), so a table can
be measured in chunks of a few minutes each; ``report`` writes the markdown table. Usage:

    python benchmarks/long_context.py needle --corpus wiki --context 4096 --trials 10 --rules window,snapkv --keep 0.25,0.5
    python benchmarks/long_context.py continuation --corpus wiki --context 4096 --chunks 4 --rules window,snapkv --keep 0.25,0.5
    python benchmarks/long_context.py speed --prefill 8192 --decode-context 7680
    python benchmarks/long_context.py report [--out docs/results]
    python benchmarks/long_context.py all --rules window,quest   # all of the above, as benchmarks/results.py runs it

A rule may carry settings: ``quest+page_size=8`` (``kv.page_size=8``); ``+dense=N`` keeps the
first N layers dense and lowers the others' kept fraction so that the average stays ``--keep``.

Contexts: a needle trial is ``context`` tokens of haystack (needle inside) plus the question;
a continuation chunk is a prefix of ``context - 512`` tokens (compressed) and 512 scored
tokens. A window configuration keeps ``sinks + W = keep * (compressed length)`` entries,
so its kept fraction equals the importance rules' (both are measured, not assumed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quicksilver import load_corpus, load_model  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.engine import Engine  # noqa: E402
from quicksilver.evaluate import tokenize_documents  # noqa: E402
from quicksilver.hardware import describe  # noqa: E402
from quicksilver.results_io import write_atomic, write_json_atomic  # noqa: E402

CONTINUATION = 512
SINKS = 4
N_LAYERS = 30  # smollm2-135m


def kv_config(rule: str, keep: float, compressed: int, n_layers: int = N_LAYERS) -> Config:
    """The configuration of ``rule`` at kept fraction ``keep`` of a ``compressed``-token context.

    ``rule`` is a selection name, optionally with settings: ``quest+page_size=8+dense=2``.
    ``dense=N`` keeps the first N layers dense (``kv.layers_from``, as Quest leaves its first
    two layers) and lowers the other layers' ``keep_fraction`` so that the average over the
    ``n_layers`` layers stays ``keep``.
    """
    name, *opts = rule.split("+")
    extra = {}
    for opt in opts:
        k, _, v = opt.partition("=")
        extra[k] = int(v) if v.lstrip("-").isdigit() else float(v)
    dense = extra.pop("dense", 0)
    if name == "window":
        return Config.from_dict({"kv": {"enabled": True, "sink_tokens": SINKS, "recent_window": max(1, round(keep * compressed) - SINKS), **extra}})
    if dense:
        extra |= {"layers_from": dense}
        keep = (keep * n_layers - dense) / (n_layers - dense)
    return Config.from_dict({"kv": {"enabled": True, "selection": name, "keep_fraction": keep, "sink_tokens": SINKS, **extra}})


def load(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {"needle": {}, "needle_baseline": {}, "continuation": {}, "speed": {}}


def needle(args, data, path):
    from quicksilver.needle import DEFAULT_DEPTHS, answer_key, make_trials, run_trial, summarize

    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    source = load_corpus(args.corpus, "test")
    haystack = tokenize_documents(tok, source.documents, args.context * 4)
    trials = make_trials(tok, haystack, [args.context], DEFAULT_DEPTHS, args.trials, args.seed)
    bkey = f"{args.corpus}/{args.context}/{args.seed}"
    base = data["needle_baseline"].setdefault(bkey, {})
    baseline = Engine(model)
    for i, t in enumerate(trials):
        if str(i) not in base:
            tokens, _ = run_trial(baseline, t)
            base[str(i)] = {"answer": tok.decode(tokens), "correct": answer_key(tok.decode(tokens)) == t.key}
            write_json_atomic(path, data)
    for rule in args.rules:
        for keep in args.keep:
            key = f"{args.corpus}/{args.context}/{rule}/{keep:g}"
            done = data["needle"].get(key, {}).get("trials_detail", [])
            if len(done) >= len(trials):
                continue
            engine = Engine(model, kv_config(rule, keep, args.context))
            rows = []
            t0 = time.perf_counter()
            for i, t in enumerate(trials):
                tokens, kept = run_trial(engine, t)
                text = tok.decode(tokens)
                rows.append({"context": t.context, "depth": t.depth, "key": t.key, "answer": text, "baseline_answer": base[str(i)]["answer"],
                             "correct": answer_key(text) == t.key, "baseline_correct": base[str(i)]["correct"], "kept_fraction": kept})
            data["needle"][key] = {"corpus": args.corpus, "context": args.context, "rule": rule, "keep": keep, "seed": args.seed,
                                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), **summarize(rows)}
            write_json_atomic(path, data)
            r = data["needle"][key]
            print(f"needle {key}: {r['accuracy']:.0%} (stock {r['baseline_accuracy']:.0%}), kept {r['kv_fraction']:.3f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)


def continuation(args, data, path):
    from quicksilver.continuation import score_chunk

    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    prefix = args.context - CONTINUATION
    ids = tokenize_documents(tok, load_corpus(args.corpus, "test").documents, args.context * args.chunks)
    n = min(args.chunks, ids.numel() // args.context)
    chunks = [ids[i * args.context : (i + 1) * args.context] for i in range(n)]
    bkey = f"baseline/{args.corpus}/{args.context}"
    base = data["continuation"].setdefault(bkey, {"nll": []})
    baseline = Engine(model)
    for c in chunks[len(base["nll"]):]:
        base["nll"].append(score_chunk(baseline, c[:prefix], c[prefix:])[0])
        write_json_atomic(path, data)
    for rule in args.rules:
        for keep in args.keep:
            key = f"{args.corpus}/{args.context}/{rule}/{keep:g}"
            if len(data["continuation"].get(key, {}).get("nll", [])) >= n:
                continue
            engine = Engine(model, kv_config(rule, keep, prefix))
            nll, kept = [], []
            t0 = time.perf_counter()
            for c in chunks:
                a, k = score_chunk(engine, c[:prefix], c[prefix:])
                nll.append(a)
                kept.append(k)
            tokens = n * CONTINUATION
            ppl, bppl = math.exp(sum(nll) / tokens), math.exp(sum(base["nll"][:n]) / tokens)
            data["continuation"][key] = {"corpus": args.corpus, "context": args.context, "rule": rule, "keep": keep, "chunks": n,
                                         "prefix_tokens": prefix, "continuation_tokens": CONTINUATION, "nll": nll, "perplexity": ppl,
                                         "baseline_perplexity": bppl, "relative_delta_perplexity": ppl / bppl - 1,
                                         "kv_fraction": sum(kept) / n, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
            write_json_atomic(path, data)
            print(f"continuation {key}: {ppl:.3f} vs {bppl:.3f} ({(ppl / bppl - 1) * 100:+.2f}%), kept {sum(kept) / n:.3f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)


def speed(args, data, path):
    """Prefill at ``--prefill`` tokens through ``evaluate_model`` (stock and quest interleaved, one warm-up each), decode at
    ``--decode-context`` tokens (steps of off and of each rule alternate), and the generation KV bytes of each rule."""
    from quicksilver.evaluate import evaluate_model
    from quicksilver.generate import decode_one_token, new_caches, prefill

    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    out = data.setdefault("speed", {})
    out.update({"machine": describe(), "dtype": dtype, "threads": torch.get_num_threads(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
    for rule in args.prefill_rules.split(","):
        if args.prefill:
            r = evaluate_model(corpus=args.corpus, window=args.prefill, max_tokens=args.prefill, loaded=(model, tok), dtype=args.dtype,
                               config=kv_config(rule, args.keep[0], args.prefill))
            out[f"prefill/{rule}/{args.keep[0]:g}"] = {"tokens": args.prefill, "speedup": r["speedup"], "relative_delta_perplexity":
                                                       r["relative_delta_perplexity"], "kv_fraction": r["kv_fraction"],
                                                       "seconds": r["wall_seconds"], "baseline_seconds": r["baseline"]["wall_seconds"]}
            print(f"prefill {args.prefill} {rule}: {r['speedup']:.2f}x", flush=True)
            write_json_atomic(path, data)
        if args.promise:  # the presets' promise setting: 4,096-token windows over the first 8,192 tokens
            r = evaluate_model(corpus=args.corpus, window=4096, max_tokens=8192, loaded=(model, tok), dtype=args.dtype,
                               config=kv_config(rule, args.keep[0], 4096))
            out[f"eval4096/{rule}/{args.keep[0]:g}"] = {"tokens": 8192, "window": 4096, "speedup": r["speedup"],
                                                        "relative_delta_perplexity": r["relative_delta_perplexity"], "kv_fraction": r["kv_fraction"],
                                                        "seconds": r["wall_seconds"], "baseline_seconds": r["baseline"]["wall_seconds"]}
            print(f"eval 4096-token windows {rule}: {r['relative_delta_perplexity'] * 100:+.2f}%, {r['speedup']:.2f}x", flush=True)
            write_json_atomic(path, data)
    if not args.decode_context:
        return
    n, steps = args.decode_context, args.steps
    prompt = tokenize_documents(tok, load_corpus(args.corpus, "test").documents, n)[:n]
    engines = {"off": Engine(model)} | {r: Engine(model, kv_config(r, args.keep[0], n)) for r in args.rules}
    caches, tokens, seconds = {}, {}, {name: 0.0 for name in engines}
    with torch.inference_mode():
        for name, e in engines.items():
            caches[name] = new_caches(e, [n + steps + 4])[0]  # what generate uses: a pooled cache for off
            logits, _ = prefill(e, prompt, caches[name])
            tokens[name] = logits.argmax(-1)
        for i in range(steps + 2):  # two warm-up steps each; then the engines alternate step by step
            for name in (list(engines) if i % 2 else list(engines)[::-1]):
                t0 = time.perf_counter()
                logits, _ = decode_one_token(engines[name], tokens[name], [caches[name]])
                if i >= 2:
                    seconds[name] += time.perf_counter() - t0
                tokens[name] = logits.argmax(-1)
    full = caches["off"].nbytes()
    for name in engines:
        out[f"decode/{name}/{args.keep[0]:g}"] = {"context": n, "steps": steps, "tokens_per_second": steps / seconds[name],
                                                   "speedup_vs_off": seconds["off"] / seconds[name], "kv_bytes": caches[name].nbytes(),
                                                   "kv_full_bytes": full, "kv_bytes_fraction": caches[name].nbytes() / full}
        print(f"decode at {n}: {name} {steps / seconds[name]:.2f} tok/s ({seconds['off'] / seconds[name]:.2f}x off), "
              f"KV {caches[name].nbytes() / full:.3f} of full", flush=True)
    write_json_atomic(path, data)


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def report(args, data, path):
    """docs/results/long_context.md from the accumulated JSON."""
    lines = [f"Command: `python benchmarks/long_context.py needle|continuation|speed ...` then `report` (see the script's usage), "
             f"smollm2-135m in bfloat16 (auto on this CPU), test splits; machine: {data.get('speed', {}).get('machine', describe())}; "
             f"measured {', '.join(sorted({e['date'] for e in [*data['needle'].values(), *data['continuation'].values()] if 'date' in e}))} "
             f"on a shared machine (1 thread per run). Raw results: `docs/results/long_context.json`.", ""]
    for corpus in sorted({e["corpus"] for e in data["needle"].values()}):
        entries = [e for e in data["needle"].values() if e["corpus"] == corpus]
        cols = sorted({(e["rule"], e["keep"]) for e in entries}, key=lambda c: (c[1], c[0] != "window", c[0]))
        lines += [f"Pass-key retrieval on `{corpus}` (trials per context as shown; the same needles for every column; "
                  "kept = share of the context's K/V entries the question and answer read, measured):", "",
                  "| context | trials | stock | " + " | ".join(f"{r} {k:.0%}" for r, k in cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for n in sorted({e["context"] for e in entries}):
            row = {(e["rule"], e["keep"]): e for e in entries if e["context"] == n}
            any_e = next(iter(row.values()))
            cells = [f"{row[c]['accuracy'] * row[c]['trials']:.0f}/{row[c]['trials']} (kept {row[c]['kv_fraction']:.1%})" if c in row else "" for c in cols]
            lines.append(f"| {n:,} | {any_e['trials']} | {any_e['baseline_accuracy'] * any_e['trials']:.0f}/{any_e['trials']} | " + " | ".join(cells) + " |")
        lines.append("")
    for corpus in sorted({e["corpus"] for k, e in data["continuation"].items() if not k.startswith("baseline/")}):
        entries = [e for k, e in data["continuation"].items() if not k.startswith("baseline/") and e["corpus"] == corpus]
        cols = sorted({(e["rule"], e["keep"]) for e in entries}, key=lambda c: (c[1], c[0] != "window", c[0]))
        lines += [f"Continuation perplexity on `{corpus}`: the prefix (context - 512 tokens) compressed, the next 512 tokens scored "
                  "(relative perplexity increase against the stock model on the same chunks; kept measured):", "",
                  "| context | chunks | stock PPL | " + " | ".join(f"{r} {k:.0%}" for r, k in cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for n in sorted({e["context"] for e in entries}):
            row = {(e["rule"], e["keep"]): e for e in entries if e["context"] == n}
            any_e = next(iter(row.values()))
            cells = [f"{_pct(row[c]['relative_delta_perplexity'])} (kept {row[c]['kv_fraction']:.1%})" if c in row else "" for c in cols]
            lines.append(f"| {n:,} | {any_e['chunks']} | {any_e['baseline_perplexity']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    sp = data.get("speed", {})
    if any(k.startswith(("prefill/", "decode/")) for k in sp):
        lines += [f"Speed ({sp['dtype']}, {sp['threads']} threads, `/work/wt/bin/quiet`, {sp['date']}): prefill through "
                  "`evaluate_model` (the code of `quicksilver eval --window N --max-tokens N`; stock and engine interleaved after a "
                  "warm-up each); decode steps of every engine alternating, each after prefilling the same wiki prompt; "
                  "KV bytes of each engine's cache after decoding, against the full cache:", "",
                  "| measure | configuration | result | KV bytes / full | perplexity |", "|---|---|---|---|---|"]
        for k, e in sorted(sp.items()):
            if k.startswith("prefill/"):
                lines.append(f"| prefill {e['tokens']:,} tokens | {k.split('/')[1]} {float(k.split('/')[2]):.0%} | {e['speedup']:.2f}x the stock model "
                             f"({e['baseline_seconds']:.1f} s -> {e['seconds']:.1f} s) | | {_pct(e['relative_delta_perplexity'])} |")
            elif k.startswith("eval4096/"):
                lines.append(f"| eval, 4,096-token windows, {e['tokens']:,} tokens | {k.split('/')[1]} {float(k.split('/')[2]):.0%} | {e['speedup']:.2f}x "
                             f"the stock model (kv_fraction {e['kv_fraction']:.1%}) | | {_pct(e['relative_delta_perplexity'])} |")
            elif k.startswith("decode/"):
                lines.append(f"| decode at {e['context']:,} tokens | {k.split('/')[1]} {float(k.split('/')[2]):.0%} | {e['tokens_per_second']:.2f} tok/s, "
                             f"{e['speedup_vs_off']:.2f}x off | {e['kv_bytes_fraction']:.3f} | |")
        lines.append("")
    write_atomic(ROOT / args.out / "long_context.md", "\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out}/long_context.md")


def run_all(args, data, path):
    """The RESULTS plan: needle and continuation at every context for window and ``--rules``, then speed, then the report."""
    for n in (2048, 4096, 7680):
        args.context = n
        needle(args, data, path)
        continuation(args, data, path)
    speed(argparse.Namespace(**{**vars(args), "rules": [r for r in args.rules if r != "window"], "keep": [0.25]}), data, path)
    report(args, data, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["needle", "continuation", "speed", "report", "all"])
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rules", default="window,snapkv")
    ap.add_argument("--keep", default="0.25,0.5")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prefill", type=int, default=8192, help="speed: prefill length (0: skip)")
    ap.add_argument("--decode-context", type=int, default=7680, help="speed: decode after this many tokens (0: skip)")
    ap.add_argument("--steps", type=int, default=24, help="speed: timed decode steps per engine")
    ap.add_argument("--prefill-rules", default="quest", help="speed: rules timed at prefill (comma-separated)")
    ap.add_argument("--promise", type=int, default=1, help="speed: also evaluate 4,096-token windows over 8,192 tokens (1) or not (0)")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    args.keep = [float(k) for k in args.keep.split(",")]
    path = ROOT / args.out / "long_context.json"
    data = load(path)
    torch.manual_seed(0)
    {"needle": needle, "continuation": continuation, "speed": speed, "report": report, "all": run_all}[args.task](args, data, path)


if __name__ == "__main__":
    main()
