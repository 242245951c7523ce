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
    python benchmarks/long_context.py all --corpus wiki,news --rules window,quest   # all of the above, as benchmarks/results.py runs it

A rule may carry settings: ``quest+page_size=8`` (``kv.page_size=8``); ``+dense=N`` keeps the
first N layers dense and lowers the others' kept fraction so that the average stays ``--keep``.

Contexts: a needle trial is ``context`` tokens of haystack (needle inside) plus the question;
a continuation chunk is a prefix of ``context - 512`` tokens (compressed) and 512 scored
tokens. A window configuration keeps ``sinks + W = keep * (compressed length)`` entries,
so its kept fraction equals the importance rules' (both are measured, not assumed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import command_line, run_meta  # noqa: E402
from quicksilver import load_corpus, load_model  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.engine import Engine  # noqa: E402
from quicksilver.evaluate import tokenize_documents  # noqa: E402
from quicksilver.hardware import describe  # noqa: E402
from quicksilver.results_io import write_atomic, write_json_atomic  # noqa: E402

CONTINUATION = 512
SINKS = 4
MIN_TRIALS = 5  # the bars table judges a pass-key point on at least this many trials
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


_SEEN: dict = {}  # (section, key) -> the JSON of an entry as this run last read or wrote it


def _mark(data: dict) -> None:
    for section, entries in data.items():
        for key, entry in (entries.items() if isinstance(entries, dict) else ()):
            _SEEN[(section, key)] = json.dumps(entry, sort_keys=True)


MEASURED = ("needle", "needle_baseline", "continuation", "speed")


def _this_code(data: dict) -> dict:
    """``data`` with its measured entries dropped unless the package source that measured them is this one
    (``quicksilver.results_io.code_fingerprint``): a run resumes its own trials, never older code's."""
    from quicksilver.results_io import code_fingerprint, code_version

    if data.get("code") == code_fingerprint():
        return data
    return {**{k: v for k, v in data.items() if k not in MEASURED}, "code": code_fingerprint(), "commit": code_version(ROOT)}


def load(path: Path) -> dict:
    data = _this_code(json.loads(path.read_text()) if path.is_file() else {})
    data = {s: data.get(s, {}) for s in MEASURED} | data
    _mark(data)
    return data


def save(path: Path, data: dict) -> None:
    """Write the entries this run changed over what is on disk now, so runs of different tables into one file may overlap.

    Under a lock, the file is read again; each entry this run added or changed since it last read or
    wrote it replaces the disk's (a stock baseline's trials merge one by one); every other entry on
    disk stays, and the entries this run has not got yet join its ``data``, its own objects kept.
    """
    import fcntl
    import tempfile

    lock_path = Path(tempfile.gettempdir()) / f"quicksilver-{path.resolve().as_posix().strip('/').replace('/', '_')}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = _this_code(json.loads(path.read_text()) if path.is_file() else {})
        for section, entries in data.items():
            if not isinstance(entries, dict):  # code, commit, command: this run's (the disk's code is this code)
                disk[section] = entries
                continue
            into = disk.setdefault(section, {})
            for key, entry in entries.items():
                if json.dumps(entry, sort_keys=True) == _SEEN.get((section, key)):
                    continue  # unchanged here: the disk's may be newer
                if section == "needle_baseline" and isinstance(into.get(key), dict):
                    into[key].update(entry)
                else:
                    into[key] = entry
        write_json_atomic(path, disk)
    for section, entries in disk.items():
        if not isinstance(entries, dict):
            continue
        mine = data.setdefault(section, {})
        for key, entry in entries.items():
            if key not in mine:
                mine[key] = json.loads(json.dumps(entry))
            elif section == "needle_baseline":
                for trial, row in entry.items():
                    mine[key].setdefault(trial, row)
            elif json.dumps(mine[key], sort_keys=True) == _SEEN.get((section, key)) and isinstance(mine[key], dict):
                mine[key].clear()  # not changed here: take the disk's, in place (callers hold the object)
                mine[key].update(json.loads(json.dumps(entry)))
    _mark(data)


def _out_of_time(args) -> bool:
    """Whether this run's ``--budget-s`` is spent (checked between trials and chunks: a run stops cleanly, resumable)."""
    return bool(args.budget_s) and time.perf_counter() - args.started > args.budget_s


def needle(args, data, path):
    """Trial by trial: the stock model, then every (rule, keep) that lacks this trial, so the columns hold the same
    trials whenever a run stops; a later run with the same or more ``--trials`` goes on where the last one stopped."""
    from quicksilver.needle import DEFAULT_DEPTHS, answer_key, make_trials, run_trial, summarize

    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    source = load_corpus(args.corpus, "test")
    haystack = tokenize_documents(tok, source.documents, args.context * 4)
    trials = make_trials(tok, haystack, [args.context], DEFAULT_DEPTHS, args.trials, args.seed)  # the first k of n are the k trials
    bkey = f"{args.corpus}/{args.context}/{args.seed}"
    base = data["needle_baseline"].setdefault(bkey, {})
    baseline = Engine(model)
    configs = [(f"{args.corpus}/{args.context}/{rule}/{keep:g}", rule, keep) for rule in args.rules for keep in args.keep]
    engines = {key: Engine(model, kv_config(rule, keep, args.context)) for key, rule, keep in configs}
    spent = {key: 0.0 for key, _, _ in configs}
    for i, t in enumerate(trials):
        if _out_of_time(args):
            print(f"needle: --budget-s spent before trial {i} of {len(trials)}; rerun to go on", flush=True)
            break
        if str(i) not in base:
            tokens, _ = run_trial(baseline, t)
            base[str(i)] = {"answer": tok.decode(tokens), "correct": answer_key(tok.decode(tokens)) == t.key}
            save(path, data)
        for key, rule, keep in configs:
            rows = data["needle"].get(key, {}).get("trials_detail", [])
            if len(rows) > i:
                continue
            t0 = time.perf_counter()
            tokens, kept = run_trial(engines[key], t)
            spent[key] += time.perf_counter() - t0
            text = tok.decode(tokens)
            rows = [*rows, {"context": t.context, "depth": t.depth, "key": t.key, "answer": text, "baseline_answer": base[str(i)]["answer"],
                            "correct": answer_key(text) == t.key, "baseline_correct": base[str(i)]["correct"], "kept_fraction": kept}]
            data["needle"][key] = {"corpus": args.corpus, "context": args.context, "rule": rule, "keep": keep, "seed": args.seed,
                                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), **summarize(rows)}
            save(path, data)
    for key, _, _ in configs:
        r = data["needle"].get(key)
        if r:
            print(f"needle {key}: {r['accuracy'] * r['trials']:.0f}/{r['trials']} (stock {r['baseline_accuracy'] * r['trials']:.0f}), "
                  f"kept {r['kv_fraction']:.3f}, {spent[key]:.0f} s this run", flush=True)


def continuation(args, data, path):
    """Chunk by chunk, as ``needle`` goes trial by trial (resumable, the columns on the same chunks)."""
    from quicksilver.continuation import score_chunk

    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    prefix = args.context - CONTINUATION
    ids = tokenize_documents(tok, load_corpus(args.corpus, "test").documents, args.context * args.chunks)
    n = min(args.chunks, ids.numel() // args.context)
    chunks = [ids[i * args.context : (i + 1) * args.context] for i in range(n)]
    bkey = f"baseline/{args.corpus}/{args.context}"
    base = data["continuation"].setdefault(bkey, {"nll": []})
    baseline = Engine(model)
    configs = [(f"{args.corpus}/{args.context}/{rule}/{keep:g}", rule, keep) for rule in args.rules for keep in args.keep]
    engines = {key: Engine(model, kv_config(rule, keep, prefix)) for key, rule, keep in configs}
    for i, c in enumerate(chunks):
        if _out_of_time(args):
            print(f"continuation: --budget-s spent before chunk {i} of {n}; rerun to go on", flush=True)
            break
        if len(base["nll"]) <= i:
            base["nll"].append(score_chunk(baseline, c[:prefix], c[prefix:])[0])
            save(path, data)
        for key, rule, keep in configs:
            e = data["continuation"].get(key, {})
            nll = e.get("nll", [])
            if len(nll) > i:
                continue
            kept = e.get("kept", [e.get("kv_fraction", 0.0)] * len(nll))  # entries written before per-chunk kept fractions
            a, k = score_chunk(engines[key], c[:prefix], c[prefix:])
            nll, kept = [*nll, a], [*kept, k]
            m = len(nll)
            tokens = m * CONTINUATION
            ppl, bppl = math.exp(sum(nll) / tokens), math.exp(sum(base["nll"][:m]) / tokens)
            data["continuation"][key] = {"corpus": args.corpus, "context": args.context, "rule": rule, "keep": keep, "chunks": m,
                                         "prefix_tokens": prefix, "continuation_tokens": CONTINUATION, "nll": nll, "kept": kept,
                                         "perplexity": ppl, "baseline_perplexity": bppl, "relative_delta_perplexity": ppl / bppl - 1,
                                         "kv_fraction": sum(kept) / m, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
            save(path, data)
    for key, _, _ in configs:
        r = data["continuation"].get(key)
        if r:
            print(f"continuation {key}: {r['perplexity']:.3f} vs {r['baseline_perplexity']:.3f} ({r['relative_delta_perplexity'] * 100:+.2f}%), "
                  f"{r['chunks']} chunks, kept {r['kv_fraction']:.3f}", flush=True)


def speed(args, data, path):
    """Prefill at ``--prefill`` tokens through ``evaluate_model`` (stock and quest interleaved, one warm-up each), decode at
    ``--decode-context`` tokens (steps of off and of each rule alternate), and the generation KV bytes of each rule."""
    from quicksilver.evaluate import evaluate_model
    from quicksilver.decoding import decode_one_token, new_caches, prefill

    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    out = data.setdefault("speed", {})
    meta = run_meta()
    out.update({"machine": meta["machine"], "dtype": dtype, "threads": meta["threads"], "date": meta["date"], "commit": meta["commit"]})
    for rule in args.prefill_rules.split(","):
        if args.prefill:
            r = evaluate_model(corpus=args.corpus, window=args.prefill, max_tokens=args.prefill, loaded=(model, tok), dtype=args.dtype,
                               config=kv_config(rule, args.keep[0], args.prefill))
            out[f"prefill/{rule}/{args.keep[0]:g}"] = {"tokens": args.prefill, "speedup": r["speedup"], "relative_delta_perplexity":
                                                       r["relative_delta_perplexity"], "kv_fraction": r["kv_fraction"],
                                                       "seconds": r["wall_seconds"], "baseline_seconds": r["baseline"]["wall_seconds"]}
            print(f"prefill {args.prefill} {rule}: {r['speedup']:.2f}x", flush=True)
            save(path, data)
        if args.promise:  # the presets' promise setting: 4,096-token windows over the first 8,192 tokens
            r = evaluate_model(corpus=args.corpus, window=4096, max_tokens=8192, loaded=(model, tok), dtype=args.dtype,
                               config=kv_config(rule, args.keep[0], 4096))
            out[f"eval4096/{rule}/{args.keep[0]:g}"] = {"tokens": 8192, "window": 4096, "speedup": r["speedup"],
                                                        "relative_delta_perplexity": r["relative_delta_perplexity"], "kv_fraction": r["kv_fraction"],
                                                        "seconds": r["wall_seconds"], "baseline_seconds": r["baseline"]["wall_seconds"]}
            print(f"eval 4096-token windows {rule}: {r['relative_delta_perplexity'] * 100:+.2f}%, {r['speedup']:.2f}x", flush=True)
            save(path, data)
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
    save(path, data)


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def _count(e: dict, field: str) -> str:
    return f"{e[field] * e['trials']:.0f}"


def report(args, data, path):
    """docs/results/long_context.md from the accumulated JSON."""
    commit = f" — commit {data['commit']}" if data.get("commit") else ""
    command = data.get("command") or "python benchmarks/long_context.py needle|continuation|speed ...` then `report"
    speed_meta = data.get("speed", {})
    lines = [f"Command: `{command}`{commit}; smollm2-135m in {speed_meta.get('dtype', 'the auto dtype')}, test splits; "
             f"machine: {speed_meta.get('machine', describe())}, {speed_meta.get('threads', 'default')} threads; "
             f"measured {', '.join(sorted({e['date'] for e in [*data['needle'].values(), *data['continuation'].values()] if 'date' in e}))}. "
             "Raw results: `docs/results/long_context.json`.", ""]
    for corpus in sorted({e["corpus"] for e in data["needle"].values()}):
        entries = [e for e in data["needle"].values() if e["corpus"] == corpus]
        cols = sorted({(e["rule"], e["keep"]) for e in entries}, key=lambda c: (c[1], c[0] != "window", c[0]))
        lines += [f"Pass-key retrieval on `{corpus}` (the same needles for every column: a cell run on fewer trials than its "
                  "row says the stock model's count on those trials; kept = share of the context's K/V entries the question "
                  "and answer read, measured):", "",
                  "| context | trials | stock | " + " | ".join(f"{r} {k:.0%}" for r, k in cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for n in sorted({e["context"] for e in entries}):
            row = {(e["rule"], e["keep"]): e for e in entries if e["context"] == n}
            most = max(row.values(), key=lambda e: e["trials"])
            cells = []
            for c in cols:
                if c not in row:
                    cells.append("")
                    continue
                e = row[c]
                stock = "" if e["trials"] == most["trials"] else f", stock {_count(e, 'baseline_accuracy')}"
                cells.append(f"{_count(e, 'accuracy')}/{e['trials']} (kept {e['kv_fraction']:.1%}{stock})")
            lines.append(f"| {n:,} | {most['trials']} | {_count(most, 'baseline_accuracy')}/{most['trials']} | " + " | ".join(cells) + " |")
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
    for best in args.best.split(","):
        lines += acceptance(data, best)
    sp = data.get("speed", {})
    if any(k.startswith(("prefill/", "decode/")) for k in sp):
        lines += [f"Speed ({sp['dtype']}, {sp['threads']} threads, {sp['date']}): prefill through "
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


def acceptance(data: dict, best: str) -> list[str]:
    """Issue #12's bars per (corpus, context, kept fraction), for the window and the rule ``best``.

    Pass keys: where the window loses more than 1 in 10 against the stock model, ``best`` must stay within 1 in 10 of it
    (on the same trials; the shorter column's trials). Continuation: ``best``'s perplexity increase is at most half the
    window's.
    """
    rows = []
    points = sorted({(e["corpus"], e["context"], e["keep"]) for e in [*data["needle"].values(),
                     *(e for k, e in data["continuation"].items() if not k.startswith("baseline/"))] if e["rule"] == best})
    for corpus, n, keep in points:
        nw, nb = (data["needle"].get(f"{corpus}/{n}/{r}/{keep:g}") for r in ("window", best))
        cw, cb = (data["continuation"].get(f"{corpus}/{n}/{r}/{keep:g}") for r in ("window", best))
        needle_cells = ["", "", "", "", "not run"]
        if nw and nb:
            m = min(nw["trials"], nb["trials"])
            w, b = (sum(r["correct"] for r in e["trials_detail"][:m]) for e in (nw, nb))
            st = sum(r["baseline_correct"] for r in nb["trials_detail"][:m])
            if m < MIN_TRIALS:
                verdict = f"too few trials to judge (fewer than {MIN_TRIALS})"
            elif w >= st - 0.1 * m:
                verdict = "window holds (bar does not apply)"
            else:
                verdict = "**met**" if b >= st - 0.1 * m - 1e-9 else "**not met**"
            needle_cells = [str(m), f"{st}/{m}", f"{w}/{m}", f"{b}/{m}", verdict]
        cont_cells = ["", "", "", "not run"]
        if cw and cb:
            c = min(cw["chunks"], cb["chunks"])
            base = data["continuation"][f"baseline/{corpus}/{n}"]["nll"][:c]
            dw, db = (math.exp((sum(e["nll"][:c]) - sum(base)) / (c * CONTINUATION)) - 1 for e in (cw, cb))
            cont_cells = [str(c), _pct(dw), _pct(db), ("**met**" if db <= dw / 2 else "**not met**") + f" (bar {_pct(dw / 2)})"]
        rows.append(f"| `{corpus}` | {n:,} | {keep:.0%} | " + " | ".join(needle_cells + cont_cells) + " |")
    if not rows:
        return []
    return [f"Issue #12's bars, `{best}` against the window at the same kept fraction (pass keys: where the window loses "
            "more than 1 in 10 of the stock model's, the rule must stay within 1 in 10 of it; continuation: at most half the "
            "window's perplexity increase; counted on the trials and chunks both columns ran):", "",
            "| corpus | context | kept | trials | stock | window | " + best + " | pass-key bar | chunks | window ΔPPL | "
            + best + " ΔPPL | continuation bar |", "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def run_all(args, data, path):
    """The RESULTS plan: needle and continuation on every corpus of ``--corpus`` (comma-separated) at every context
    for window and ``--rules``, then speed (on the first corpus), then the report."""
    data["command"] = command_line()
    corpora = args.corpus.split(",")
    for corpus in corpora:
        for n in args.contexts:
            args.corpus, args.context = corpus, n
            needle(args, data, path)
            continuation(args, data, path)
    args.corpus = corpora[0]
    speed(argparse.Namespace(**{**vars(args), "rules": [r for r in args.rules if r != "window"], "keep": [0.25]}), data, path)
    report(args, data, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["needle", "continuation", "speed", "report", "all"])
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--contexts", default="2048,4096,7680", help="all: the contexts of the needle and continuation grid")
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
    ap.add_argument("--budget-s", type=float, default=0, help="needle/continuation: start no trial or chunk after this many seconds (0: no limit)")
    ap.add_argument("--best", default="quest+page_size=2+block_pages=16,quest+page_size=8",
                    help="report: the rules checked against issue #12's bars (comma-separated, one table each)")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    args.started = time.perf_counter()
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    args.keep = [float(k) for k in args.keep.split(",")]
    try:
        args.contexts = [int(n) for n in args.contexts.split(",") if n.strip()]
    except ValueError:
        sys.exit(f"error: --contexts takes comma-separated token counts, got {args.contexts!r}")
    path = ROOT / args.out / "long_context.json"
    data = load(path)
    torch.manual_seed(0)
    {"needle": needle, "continuation": continuation, "speed": speed, "report": report, "all": run_all}[args.task](args, data, path)


if __name__ == "__main__":
    main()
