"""kvpress side by side: NVIDIA kvpress's presses and our KV selection rules on the same trials.

    python benchmarks/kvpress_side.py --context 2048 --trials 10          # one context; merged into the JSON
    python benchmarks/kvpress_side.py --continuation-chunks 4 --no-needle  # continuation perplexity only
    python benchmarks/kvpress_side.py --policies none --ours-from docs/results/long_context.json --context 4096
                                       # kvpress only; our columns read from benchmarks/long_context.py's results
    python benchmarks/kvpress_side.py --render                             # the table from the JSON, nothing run

kvpress 0.5.5 pins transformers < 5.3, so it runs in a virtual environment of its own, built
once under ``$QUICKSILVER_CACHE/venvs/kvpress`` (torch pinned to the exact build this venv
runs, so no CUDA wheels are pulled where ours is a CPU build). Nothing in the quicksilver
package imports kvpress: this file runs twice, as the driver here and as a worker
(``--worker JOB OUT``) in that venv, and the two exchange only JSON of token ids and results
(and, for the logit check, a .npy of our logits).

The trials are ``benchmarks/long_context.py``'s (``needle.make_trials`` on a haystack of the
first 4 x context tokens of the test split, the same seed and depths), and so are the
continuation chunks (consecutive windows of prefix + continuation tokens, no BOS), so both
sides read the very same prompts and ``--ours-from`` can set long_context.py's own results
beside kvpress's, trial by trial, instead of running our rules again. kvpress's presses are applied over a
raw-text prefill of the context only, as kvpress applies them; the question then runs on the
compressed cache and the answer is decoded greedily (kvpress's ``generate_answer`` loop,
without its pipeline's chat template). Every press compresses a cache after the layer's
attention has run, so the prefill's hidden states do not depend on the press: the worker
prefills once and hands each layer's full cache to every press's own ``compress`` (the
body of kvpress's forward hook), and checks on one prompt that this gives the same caches
as each press's context manager (``verified`` in the JSON). Our rules run through the
quicksilver API (``needle.run_trial``, ``continuation.score_chunk``) with
``kv.selection=RULE kv.keep_fraction=F`` from the ``off`` preset (recent window 64, as
SnapKV's), and ``window`` as sinks + a recent window of ``F * context - 4`` keys.

Results of every invocation merge into one JSON (by context, method and trial), written
atomically, and the markdown table is redrawn from the merged JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402  (standard library only at import: the worker in kvpress's venv imports it too)
from harness import PeerError, command_line, git_commit, peer_python, torch_pin  # noqa: E402

ROOT = harness.ROOT
KVPRESS_VERSION = "0.5.5"
TRANSFORMERS_SPEC = "transformers>=4.56,<5.3"
# press name -> (kvpress class, settings beyond compression_ratio: kvpress's defaults)
PRESSES = {
    "streaming_llm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "expected_attention": "ExpectedAttentionPress",
}
POLICIES = ("window", "knorm", "h2o", "tova", "snapkv", "quest")
SINKS = 4
STOCK = "stock"
ANSWER_TOKENS = 8  # as quicksilver needle


class BenchError(Exception):
    """Bad input or a failed step: one line on stderr, exit 2."""


# ----------------------------------------------------------------------------- pure helpers


def parse_list(text: str, known, what: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each one of ``known`` ('all': every one)."""
    if text == "all":
        return list(known)
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if not items or bad:
        raise BenchError(f"--{what} expects a comma-separated subset of {', '.join(known)}, got {text!r}")
    return items


def parse_policies(text: str) -> list[str]:
    """Our rules: 'window,quest+page_size=8' -> ['window', 'quest+page_size=8'] (a rule, then ``kv`` settings after '+')."""
    items = list(POLICIES) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x.split("+")[0] not in POLICIES or any("=" not in o for o in x.split("+")[1:])]
    if not items or bad:
        raise BenchError(f"--policies expects a comma-separated subset of {', '.join(POLICIES)} (each optionally with "
                         f"+SETTING=VALUE of kv), got {text!r}")
    return items


def parse_fractions(text: str) -> list[float]:
    """'0.25,0.5' -> [0.25, 0.5], each in (0, 1)."""
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(not 0 < f < 1 for f in out):
        raise BenchError(f"--fractions expects kept fractions in (0, 1) separated by commas, got {text!r}")
    return out


def method_name(side: str, rule: str, fraction: float | None) -> str:
    """'kvpress:snapkv@0.25', 'quicksilver:window@0.5', 'kvpress:stock'."""
    return f"{side}:{rule}" if fraction is None else f"{side}:{rule}@{fraction:g}"


def parse_method(name: str) -> tuple[str, str, float | None]:
    side, _, rest = name.partition(":")
    rule, at, frac = rest.partition("@")
    return side, rule, float(frac) if at else None


def merge(old: dict, new: dict) -> dict:
    """``new`` results over ``old``: same trials required (seed, corpus, depths, keys), later rows win.

    Layout: ``needle[context][method][trial] = {"key", "depth", "correct", "kept", "answer"}``,
    ``continuation[method][chunk] = {"nll", "tokens", "kept"}``.
    """
    if not old:
        return new
    for field in ("corpus", "seed", "depths", "model", "dtype", "prefix_tokens", "continuation_tokens"):
        a, b = old.get("meta", {}).get(field), new.get("meta", {}).get(field)
        if a is not None and b is not None and a != b:
            raise BenchError(f"the existing results were run with {field}={a!r}, this run with {b!r}: use another --output")
    out = json.loads(json.dumps(old))
    for ctx, methods in new.get("needle", {}).items():
        for method, trials in methods.items():
            for i, row in trials.items():
                prev = out.get("needle", {}).get(ctx, {})
                for other in prev.values():
                    if i in other and other[i]["key"] != row["key"]:
                        raise BenchError(f"trial {i} at context {ctx} has pass key {other[i]['key']} in the existing results and "
                                         f"{row['key']} now: the trials differ; use another --output")
                out.setdefault("needle", {}).setdefault(ctx, {}).setdefault(method, {})[i] = row
    for method, chunks in new.get("continuation", {}).items():
        out.setdefault("continuation", {}).setdefault(method, {}).update(chunks)
    for key in ("logit_check", "verified", "verified_tokens"):
        if new.get(key):
            out[key] = new[key]
    out["versions"] = {**out.get("versions", {}), **new.get("versions", {})}
    meta = {**out.get("meta", {}), **{k: v for k, v in new.get("meta", {}).items() if v is not None}}
    meta["date"] = max(d for d in (old.get("meta", {}).get("date"), new.get("meta", {}).get("date"), "") if d is not None)
    meta["commands"] = sorted(set(old.get("meta", {}).get("commands", [])) | set(new.get("meta", {}).get("commands", [])))
    out["meta"] = meta
    return out


def needle_cell(trials: dict, indices: set[str]) -> tuple[int, int, float] | None:
    """(correct, trials, mean kept) over the trials both this method and the table share."""
    rows = [trials[i] for i in indices if i in trials]
    if not rows or len(rows) < len(indices):
        return None
    return sum(r["correct"] for r in rows), len(rows), sum(r["kept"] for r in rows) / len(rows)


def continuation_ppl(chunks: dict, indices: set[str]) -> tuple[float, float] | None:
    """(perplexity, mean kept) over the chunks ``indices``."""
    rows = [chunks[i] for i in indices if i in chunks]
    if not rows or len(rows) < len(indices):
        return None
    return math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)), sum(r["kept"] for r in rows) / len(rows)


def _methods(results: dict, fraction: float | None) -> list[str]:
    names = {m for ctx in results.get("needle", {}).values() for m in ctx} | set(results.get("continuation", {}))
    keep = [m for m in names if parse_method(m)[2] == fraction]
    order = {"kvpress": (0, [STOCK, *PRESSES]), "quicksilver": (1, [STOCK, *POLICIES])}

    def key(m):
        side, rule, _ = parse_method(m)
        rank, rules = order.get(side, (2, []))
        return rank, rules.index(rule) if rule in rules else 99

    return sorted(keep, key=key)


# Our columns as benchmarks/long_context.py measured them (--ours-from): the rules below at these kept fractions.
OURS_RULES = ("window", "quest+page_size=2+block_pages=16")
OURS_FRACTIONS = (0.25, 0.5)


def ours_from_long_context(lc: dict, corpus: str, seed: int = 0, rules=OURS_RULES, fractions=OURS_FRACTIONS,
                           continuation_context: int | None = None) -> dict:
    """Our columns from long_context.py's JSON ``lc``, in this file's layout (``quicksilver:RULE@F`` and ``quicksilver:stock``).

    Needle: ``lc["needle"]["CORPUS/CONTEXT/RULE/KEEP"]["trials_detail"][i]`` is trial ``i``; the stock
    model's answers come from ``lc["needle_baseline"]["CORPUS/CONTEXT/SEED"][i]`` (keys and depths from
    any rule's row ``i`` at that context, since the baseline rows hold only answers). Continuation (at
    ``continuation_context`` tokens, prefix + scored, if given): ``lc["continuation"]`` entries' per-chunk
    summed ``nll`` and ``kept``, and ``baseline/CORPUS/CONTEXT``'s ``nll`` as our stock model.
    """
    out = {"needle": {}, "continuation": {}}
    keys: dict = {}  # context -> trial -> (key, depth), from every rule's rows (the trials are the same for all)
    for e in lc.get("needle", {}).values():
        if e.get("corpus") != corpus or e.get("seed", 0) != seed:
            continue
        for i, r in enumerate(e.get("trials_detail", [])):
            keys.setdefault(str(e["context"]), {}).setdefault(str(i), (r["key"], r["depth"]))
        if e["rule"] not in rules or not any(math.isclose(e["keep"], f) for f in fractions):
            continue
        rows = out["needle"].setdefault(str(e["context"]), {}).setdefault(method_name("quicksilver", e["rule"], e["keep"]), {})
        for i, r in enumerate(e["trials_detail"]):
            rows[str(i)] = {"key": r["key"], "depth": r["depth"], "answer": r["answer"], "correct": r["correct"], "kept": r["kept_fraction"]}
    for bkey, trials in lc.get("needle_baseline", {}).items():
        c, n, s = bkey.split("/")
        if c != corpus or int(s) != seed:
            continue
        for i, r in trials.items():
            if i in keys.get(n, {}):
                key, depth = keys[n][i]
                out["needle"].setdefault(n, {}).setdefault(method_name("quicksilver", STOCK, None), {})[i] = {
                    "key": key, "depth": depth, "answer": r["answer"], "correct": r["correct"], "kept": 1.0}
    if continuation_context:
        base = lc.get("continuation", {}).get(f"baseline/{corpus}/{continuation_context}")
        entries = [e for k, e in lc.get("continuation", {}).items() if not k.startswith("baseline/") and e.get("corpus") == corpus
                   and e.get("context") == continuation_context and e["rule"] in rules and any(math.isclose(e["keep"], f) for f in fractions)]
        if base and base.get("nll"):
            out["continuation"][method_name("quicksilver", STOCK, None)] = {
                str(i): {"nll": x, "tokens": 512, "kept": 1.0} for i, x in enumerate(base["nll"])}
        for e in entries:
            kept = e.get("kept", [e.get("kv_fraction", 0.0)] * len(e["nll"]))
            out["continuation"][method_name("quicksilver", e["rule"], e["keep"])] = {
                str(i): {"nll": x, "tokens": e.get("continuation_tokens", 512), "kept": k} for i, (x, k) in enumerate(zip(e["nll"], kept))}
    return out


def with_ours(results: dict, ours: dict, source: str) -> dict:
    """``results`` with the columns ``ours`` (from :func:`ours_from_long_context`) in place of any of the same name."""
    out = json.loads(json.dumps(results))
    for ctx, methods in ours.get("needle", {}).items():
        if ctx in out.get("needle", {}):  # only contexts kvpress ran: a column alone says nothing side by side
            out["needle"][ctx].update(methods)
    if out.get("continuation"):
        out["continuation"].update(ours.get("continuation", {}))
    out.setdefault("meta", {})["ours_source"] = source
    return out


def render_with_ours(results: dict, ours_from: str | None) -> str:
    """The markdown of ``results``, our columns read from long_context.py's JSON ``ours_from`` if given (never written)."""
    if ours_from:
        path = Path(ours_from) if Path(ours_from).is_absolute() else ROOT / ours_from
        if not path.is_file():
            raise BenchError(f"--ours-from {ours_from}: no such file")
        meta = results.get("meta", {})
        cont = (meta["prefix_tokens"] + meta["continuation_tokens"]) if meta.get("prefix_tokens") else None
        ours = ours_from_long_context(json.loads(path.read_text()), meta.get("corpus", "wiki"), meta.get("seed", 0), continuation_context=cont)
        shown = f"`{ours_from}` as of {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        results = with_ours(results, ours, shown)
    return render_markdown(results)


def stock_agreement(results: dict) -> dict:
    """Per context: (trials where kvpress's and our stock model answered the same text, trials where both were right or
    both wrong, trials both ran, the ids of trials with different texts)."""
    out = {}
    for ctx, methods in results.get("needle", {}).items():
        a, b = methods.get(method_name("kvpress", STOCK, None), {}), methods.get(method_name("quicksilver", STOCK, None), {})
        both = sorted(set(a) & set(b), key=int)
        if both:
            differ = [i for i in both if a[i]["answer"] != b[i]["answer"]]
            out[ctx] = (len(both) - len(differ), sum(a[i]["correct"] == b[i]["correct"] for i in both), len(both), differ)
    return out


def table_rows(results: dict) -> list[dict]:
    """One row per (kept fraction, method): needle accuracy per context and continuation ΔPPL.

    Each context's cells count only the trials every method of that context ran, so the
    columns compare like with like.
    """
    needle = results.get("needle", {})
    contexts = sorted(needle, key=int)
    shared = {c: set.intersection(*(set(t) for t in needle[c].values())) for c in contexts if needle[c]}
    cont = results.get("continuation", {})
    chunk_ids = set.intersection(*(set(c) for c in cont.values())) if cont else set()
    stock_ppl = {side: continuation_ppl(cont.get(method_name(side, STOCK, None), {}), chunk_ids) for side in ("kvpress", "quicksilver")}
    rows = []
    fractions = sorted({parse_method(m)[2] for ctx in needle.values() for m in ctx} | {parse_method(m)[2] for m in cont}, key=lambda f: -1 if f is None else f)
    for f in fractions:
        for m in _methods(results, f):
            side, rule, _ = parse_method(m)
            row = {"method": m, "side": side, "rule": rule, "fraction": f, "needle": {}, "kept": {}}
            for c in contexts:
                cell = needle_cell(needle[c].get(m, {}), shared.get(c, set()))
                if cell:
                    row["needle"][c] = (cell[0], cell[1])
                    row["kept"][c] = cell[2]
            ppl = continuation_ppl(cont.get(m, {}), chunk_ids) if m in cont else None
            base = stock_ppl.get(side)
            if ppl and base:
                row["ppl"], row["delta_ppl"], row["ppl_kept"] = ppl[0], ppl[0] / base[0] - 1, ppl[1]
            rows.append(row)
    return rows


def best_against_kvpress(rows: list[dict], contexts: list[str]) -> list[dict]:
    """Per kept fraction and test, kvpress's best press against our best rule (ties count as 'as good'), and against
    our best rule that evicts (every rule but ``quest``, which keeps the whole cache in memory) where that differs."""
    out = []
    for f in sorted({r["fraction"] for r in rows if r["fraction"] is not None}):
        at = [r for r in rows if r["fraction"] == f]
        tests = [(f"needle {int(c):,}", lambda r, c=c: r["needle"][c][0] if c in r["needle"] else None, max) for c in contexts]
        tests.append(("continuation", lambda r: r.get("delta_ppl"), min))
        for name, value, best in tests:
            sides = {}
            for side, keep in (("kvpress", lambda r: True), ("quicksilver", lambda r: True),
                               ("evicting", lambda r: not r["rule"].startswith("quest"))):
                scored = [(value(r), r["rule"]) for r in at if r["side"] == side.replace("evicting", "quicksilver") and keep(r)
                          and value(r) is not None]
                if scored:
                    top = best(v for v, _ in scored)
                    sides[side] = (top, [rule for v, rule in scored if v == top])
            if "kvpress" not in sides or "quicksilver" not in sides:
                continue
            fmt = (lambda v: f"{v * 100:+.2f}%") if name == "continuation" else str
            kv = sides["kvpress"][0]
            row = {"fraction": f, "test": name, "kvpress": f"{fmt(kv)} ({', '.join(sides['kvpress'][1])})"}
            for side, field in (("quicksilver", "ours"), ("evicting", "evicting")):
                if side in sides:
                    qs, qs_rules = sides[side]
                    good = qs <= kv if name == "continuation" else qs >= kv
                    row[field] = f"{fmt(qs)} ({', '.join(qs_rules)})"
                    row[field + "_verdict"] = "as good or better" if good else "**worse**"
            row["verdict"] = row["ours_verdict"]
            out.append(row)
    return out


def render_markdown(results: dict) -> str:
    """The side-by-side table (with its header: command, machine, date, versions)."""
    meta, rows = results.get("meta", {}), table_rows(results)
    contexts = sorted(results.get("needle", {}), key=int)
    v = results.get("versions", {})
    shared = {c: len(set.intersection(*(set(t) for t in results["needle"][c].values()))) for c in contexts if results["needle"][c]}
    commands = meta.get("commands", [])
    ctx_cont = (meta.get("prefix_tokens") or 0) + (meta.get("continuation_tokens") or 0)
    lines = [
        (f"Commands: {'; '.join(f'`{c}`' for c in commands)}" if len(commands) <= 2 else
         f"Commands: {len(commands)} runs (listed below), merged into one JSON by trial and chunk") + f" — last run {meta.get('date', '?')} — "
        f"{meta.get('machine', '?')}" + (f" — commit {meta['commit']}" if meta.get("commit") else "")
        + {True: "; the machine to itself (`benchmarks/quiet`).", False: "; a shared machine."}.get(meta.get("quiet"), "; load not recorded."),
        "",
        f"Model {meta.get('model', '?')} in {meta.get('dtype', '?')}; haystacks from `{meta.get('corpus', '?')}` (test split), "
        f"seed {meta.get('seed', '?')}, depths {meta.get('depths', '?')}; trials per context that every column ran: "
        + ", ".join(f"{c}: {n}" for c, n in shared.items())
        + f". kvpress {v.get('kvpress', '?')} with transformers {v.get('transformers_kvpress', '?')} and torch {v.get('torch_kvpress', '?')} "
        f"in its own venv; ours: quicksilver with transformers {v.get('transformers', '?')}, torch {v.get('torch', '?')}.",
        "",
        "The trials are `benchmarks/long_context.py`'s: trial i of a context is its trial i (the haystack is the "
        "first 4 x context tokens of the test split, `needle.make_trials` with the same seed and depths)"
        + (f"; so are the continuation chunks: chunk i is tokens [i x {ctx_cont:,}, (i + 1) x {ctx_cont:,}) of the test split, "
           f"its first {meta['prefix_tokens']:,} tokens compressed, the next {meta['continuation_tokens']} scored (no BOS, as there)"
           if meta.get("prefix_tokens") else "") + ".",
        "",
    ]
    if meta.get("ours_source"):
        lines += [f"Our columns (`quicksilver ...`) are not run here: they are read from {meta['ours_source']} (the rules "
                  f"{', '.join(f'`{r}`' for r in OURS_RULES)} at {', '.join(f'{f:.0%}' for f in OURS_FRACTIONS)} and the stock model, "
                  "as `long_context.py needle|continuation` measured them, through the quicksilver engine in the same dtype); "
                  "every cell counts only the trials and chunks that every column of its context ran.", ""]
    agree = stock_agreement(results)
    if agree:
        lines += ["The stock model's answers, kvpress's venv (its transformers' own forward) against ours on the same trials: "
                  + "; ".join(f"{int(c):,} tokens: {same}/{n} identical texts" + (f" (differ: trial {', '.join(d)})" if d else "")
                              + f", {right}/{n} equally right or wrong"
                              for c, (same, right, n, d) in sorted(agree.items(), key=lambda x: int(x[0])))
                  + ". In bfloat16 the two forwards round differently (" + ("see the logit check below" if results.get("logit_check") else
                  "`--logit-check` measures it") + "), so a greedy answer may part "
                  "after a near tie; each side's compressed columns are judged against its own stock model.", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    check = results.get("logit_check")
    if check:
        lines += ["Stock logits, quicksilver engine (`off`) against kvpress's venv (its transformers' own Llama forward), "
                  f"the first {check['tokens']} tokens of the test text: "
                  + "; ".join(f"{dt}: max |Δlogit| {c['max_abs_diff']:.2e} (logits up to {c['max_abs_logit']:.1f}), "
                              f"top-1 agreement {c['top1_agreement']:.1%}" for dt, c in check["dtypes"].items())
                  + (f" (the same check between float32 and bfloat16 on kvpress's side: {check['float32_vs_bfloat16']:.2e})"
                     if "float32_vs_bfloat16" in check else "") + ".", ""]
    ver = results.get("verified")
    if ver:
        ok = [k for k, x in ver.items() if x]
        bad = [k for k, x in ver.items() if not x]
        lines += [f"One prefill serves every press (compression runs after each layer's attention, so the prefill does not depend on it); "
                  f"on a {results.get('verified_tokens', '?')}-token prompt this gave caches identical to each press's own context "
                  f"manager for: {', '.join(ok) or 'none'}" + (f"; **different** for: {', '.join(bad)}" if bad else "") + ".", ""]
    cont_meta = ""
    if any("delta_ppl" in r for r in rows):
        n = len(set.intersection(*(set(c) for c in results["continuation"].values())))
        cont_meta = f"{n} chunk(s) of {meta.get('prefix_tokens')} + {meta.get('continuation_tokens')} tokens"
        stock = {r["side"]: r["ppl"] for r in rows if r["fraction"] is None and "ppl" in r}
        if len(stock) == 2:
            cont_meta += (f"; the stock model's perplexity on them: {stock['kvpress']:.3f} in kvpress's venv, "
                          f"{stock['quicksilver']:.3f} in ours")
    head = ["kept", "method"] + [f"needle {int(c):,}" for c in contexts] + (["cont. ΔPPL", "kept (cont.)"] if cont_meta else [])
    lines += ["Pass keys retrieved (k/n) per context"
              + (f"; continuation ΔPPL: perplexity of the next {meta.get('continuation_tokens')} tokens after the compressed prefix "
                 f"against the same side's stock model ({cont_meta})" if cont_meta else " (continuation perplexity not run)")
              + ". `kept` is the measured share of the context's K/V entries the question "
              "(or the continuation) reads; for kvpress, the entries left in its cache (every head keeps the same number, "
              "each head its own entries).", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = "100%" if r["fraction"] is None else f"{r['fraction']:.0%}"
        cells = [f, f"{r['side']} {r['rule']}"]
        for c in contexts:
            cells.append(f"{r['needle'][c][0]}/{r['needle'][c][1]}" if c in r["needle"] else "")
        if cont_meta:
            cells.append(f"{r['delta_ppl'] * 100:+.2f}%" if "delta_ppl" in r else "")
            cells.append(f"{r['ppl_kept']:.1%}" if "ppl_kept" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    verdicts = best_against_kvpress(rows, contexts)
    if verdicts:
        lines += ["", "Best of ours against kvpress's best press, per kept fraction (needle: pass keys; continuation: ΔPPL, lower is "
                  "better); the last two columns count only our rules that evict (all but `quest`, which keeps every key in memory):", "",
                  "| kept | test | kvpress best | ours best | ours | ours best, evicting | ours, evicting |", "|---|---|---|---|---|---|---|"]
        for v_ in verdicts:
            lines.append(f"| {v_['fraction']:.0%} | {v_['test']} | {v_['kvpress']} | {v_['ours']} | {v_['verdict']} | "
                         f"{v_.get('evicting', '')} | {v_.get('evicting_verdict', '')} |")
        worse = [f"{v_['test']} at {v_['fraction']:.0%}" for v_ in verdicts if v_["verdict"] != "as good or better"]
        worse_ev = [f"{v_['test']} at {v_['fraction']:.0%}" for v_ in verdicts if v_.get("evicting_verdict", "as good or better") != "as good or better"]
        lines += ["", ("Ours is **worse** than kvpress's best press at: " + "; ".join(worse) + "." if worse else
                       "Ours is as good as or better than kvpress's best press at every point measured here.")
                  + (" Our evicting rules alone are **worse** at: " + "; ".join(worse_ev) + "." if worse_ev else
                     " So are our evicting rules alone." if any("evicting" in v_ for v_ in verdicts) else "")
                  + " (A tie counts as good; on this few trials a difference of a pass key or two is within noise.)"]
        if any(r["side"] == "quicksilver" and r["rule"].startswith("quest") for r in rows):
            lines += ["", "Read `quest` with its caveat: it is query-aware and drops nothing from memory (each query, the question's "
                      "and the answer's too, reads its best pages of the full cache: the kept fraction is what a query reads), while "
                      "every press and our `window` evict before the question is seen, and KV memory falls with them. Among rules "
                      "that really free memory, compare `window` with the presses."]
    kept = [r for r in rows if r["kept"] and r["fraction"] is not None]
    if kept:
        lines += ["", "<details><summary>Measured kept fraction of the context (needle)</summary>", "",
                  "| method | " + " | ".join(f"{int(c):,}" for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
        for r in kept:
            lines.append(f"| {r['method']} | " + " | ".join(f"{r['kept'][c]:.1%}" if c in r["kept"] else "" for c in contexts) + " |")
        lines += ["", "</details>"]
    if len(commands) > 2:
        lines += ["", "<details><summary>The runs merged here</summary>", ""] + [f"- `{c}`" for c in commands] + ["", "</details>"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the kvpress venv


def ensure_venv(log) -> Path:
    """The kvpress venv's python, built once: torch as this venv's exact build, kvpress, transformers < 5.3."""
    pin = torch_pin()
    try:
        return peer_python("kvpress", [[pin], [pin, f"kvpress=={KVPRESS_VERSION}", TRANSFORMERS_SPEC]], log)
    except PeerError as e:
        raise BenchError(str(e)) from None


def run_worker(python: Path, job: dict, workdir: Path, log) -> dict:
    """Run this file as ``--worker`` in the kvpress venv on ``job``; its JSON answer (written after every
    trial: an interrupted worker still hands back what it measured)."""
    try:
        return harness.run_worker(python, Path(__file__), job, workdir, "kvpress", log)
    except PeerError as e:
        raise BenchError(str(e)) from None


# ----------------------------------------------------------------------------- worker (kvpress venv only)


def _worker(job_path: str, out_path: str) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.utils import logging as hf_logging

    import kvpress
    from kvpress.utils import extract_keys_and_values

    hf_logging.disable_progress_bar()
    job = json.loads(Path(job_path).read_text())
    torch.manual_seed(0)

    def load(dtype):
        return AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=getattr(torch, dtype)).eval()

    def make_press(rule, fraction):
        return getattr(kvpress, PRESSES[rule])(compression_ratio=1 - fraction)

    def say(msg):
        print(f"[kvpress] {msg}", file=sys.stderr, flush=True)

    class AllPresses:
        """Hooks every attention layer; after it runs, each press compresses a copy of the layer's full cache.

        The body of kvpress's ``BasePress.forward_hook`` for many presses at once: the
        cache the model keeps is left full (the stock cache), each press's result is kept
        aside, so one prefill serves every press.
        """

        def __init__(self, model, presses):
            self.model, self.presses, self.kept, self.hooks = model, presses, {n: [] for n in presses}, []

        def __enter__(self):
            for p in self.presses.values():
                p.post_init_from_model(self.model)
            lm = self.model.model
            for layer in lm.layers:
                layer.self_attn.rotary_emb = lm.rotary_emb  # as kvpress's context manager does
                self.hooks.append(layer.self_attn.register_forward_hook(self.hook, with_kwargs=True))
            return self

        def hook(self, module, args, kwargs, output):
            keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
            for name, p in self.presses.items():
                k, v = p.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
                self.kept[name].append((k.contiguous(), v.contiguous()))
            return output

        def __exit__(self, *exc):
            for h in self.hooks:
                h.remove()

        def caches(self):
            out = {}
            for name, layers in self.kept.items():
                c = DynamicCache()
                for i, (k, v) in enumerate(layers):
                    c.update(k, v, i)
                out[name] = c
            return out

    @torch.inference_mode()
    def prefill_all(model, ids, presses):
        """Stock cache, every press's cache, and the logits of the last context position."""
        stock = DynamicCache()
        with AllPresses(model, presses) as hooks:
            out = model(input_ids=ids[None], past_key_values=stock, logits_to_keep=1)
        return stock, hooks.caches(), out.logits[0, -1]

    @torch.inference_mode()
    def answer(model, cache, question, context_len):
        """kvpress's ``generate_answer``: question at the true positions after the context, greedy, fixed length."""
        pos = torch.arange(context_len, context_len + question.numel())[None]
        out = model(input_ids=question[None], past_key_values=cache, position_ids=pos, logits_to_keep=1)
        pos = pos[:, -1:] + 1
        tokens = [int(out.logits[0, -1].argmax())]
        for i in range(job["answer_tokens"] - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=pos + i)
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens

    result = {"versions": {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else KVPRESS_VERSION,
                           "transformers": transformers.__version__, "torch": torch.__version__}}
    from importlib.metadata import version as pkg_version

    result["versions"]["kvpress"] = pkg_version("kvpress")

    if job.get("logit_check"):
        chk = job["logit_check"]
        ids = torch.tensor(chk["ids"])
        result["logit_check"], theirs_by_dtype = {"tokens": ids.numel(), "dtypes": {}}, {}
        for dt, path in chk["ours"].items():
            ours = torch.from_numpy(np.load(path)).float()
            with torch.inference_mode():
                theirs = load(dt)(input_ids=ids[None]).logits[0].float()
            result["logit_check"]["dtypes"][dt] = {
                "max_abs_diff": float((ours - theirs).abs().max()), "max_abs_logit": float(theirs.abs().max()),
                "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())}
            theirs_by_dtype[dt] = theirs
        if len(theirs_by_dtype) == 2:  # a control: the same check does see the float32/bfloat16 difference
            a, b = theirs_by_dtype.values()
            result["logit_check"]["float32_vs_bfloat16"] = float((a - b).abs().max())
        say(f"logit check: {result['logit_check']}")

    model = load(job["dtype"])
    presses = {f"{r}@{f:g}": make_press(r, f) for r in job["presses"] for f in job["fractions"]}

    if job.get("verify_ids"):
        ids = torch.tensor(job["verify_ids"])
        _, mine, _ = prefill_all(model, ids, presses)
        result["verified"], result["verified_tokens"] = {}, ids.numel()
        for name, p in presses.items():
            c = DynamicCache()
            with torch.inference_mode(), p(model):
                model(input_ids=ids[None], past_key_values=c, logits_to_keep=1)
            result["verified"][name] = all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                                           for a, b in zip(c.layers, mine[name].layers))
        say(f"one prefill = each press's context manager: {result['verified']}")

    def flush(complete=False):
        result["complete"] = complete
        tmp = Path(out_path).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out_path)

    result["needle"], result["continuation"] = [], []
    flush()
    for n, t in enumerate(job["needle"]):
        t0 = time.time()
        ids, question = torch.tensor(t["ids"]), torch.tensor(t["question"])
        stock, caches, _ = prefill_all(model, ids, presses)
        row = {"id": t["id"], "answers": {}, "kept": {}}
        for name, c in caches.items():
            row["kept"][name] = c.get_seq_length() / ids.numel()
            row["answers"][name] = answer(model, c, question, ids.numel())
        row["answers"][STOCK], row["kept"][STOCK] = answer(model, stock, question, ids.numel()), 1.0
        result["needle"].append(row)
        flush()
        say(f"needle {n + 1}/{len(job['needle'])} ({ids.numel()} tokens) in {time.time() - t0:.0f} s")

    for n, ch in enumerate(job.get("continuation", [])):
        t0 = time.time()
        prefix, cont = torch.tensor(ch["prefix"]), torch.tensor(ch["cont"])
        p, c = prefix.numel(), cont.numel()
        stock, caches, first = prefill_all(model, prefix, presses)
        row = {"id": ch["id"], "nll": {}, "kept": {}}
        for name, cache in [*caches.items(), (STOCK, stock)]:
            with torch.inference_mode():
                logits = model(input_ids=cont[None], past_key_values=cache, position_ids=torch.arange(p, p + c)[None]).logits[0, :-1]
            logp = torch.log_softmax(torch.cat([first[None], logits]).float(), dim=-1)
            row["nll"][name] = float(-logp.gather(1, cont[:, None]).sum())
            row["kept"][name] = 1.0 if name == STOCK else cache.get_seq_length() - c
            if name != STOCK:
                row["kept"][name] /= p
        result["continuation"].append(row)
        flush()
        say(f"continuation chunk {n + 1}/{len(job['continuation'])} in {time.time() - t0:.0f} s")
    flush(complete=True)


# ----------------------------------------------------------------------------- driver (quicksilver venv)


def policy_config(rule: str, fraction: float, context: int):
    """Our rule at a kept fraction: ``off`` plus ``kv.selection``/``kv.keep_fraction`` (and the rule's ``+SETTING=VALUE``
    of kv); window: sinks + F*context - 4."""
    from quicksilver.config import Config

    name, *opts = rule.split("+")
    extra = [f"kv.{o}" for o in opts]
    if name == "window":
        return Config.preset("off").with_settings([f"kv.sink_tokens={SINKS}", f"kv.recent_window={max(1, round(fraction * context) - SINKS)}", *extra])
    return Config.preset("off").with_settings([f"kv.selection={name}", f"kv.keep_fraction={fraction}", *extra])


def drive(args) -> None:
    import numpy as np
    import torch

    from quicksilver.continuation import score_chunk
    from quicksilver.corpora import load_corpus
    from quicksilver.engine import Engine
    from quicksilver.evaluate import make_engine, tokenize_documents
    from quicksilver.hardware import describe
    from quicksilver.models import load_model, offline_model_folder, parse_dtype
    from quicksilver.needle import DEFAULT_CONTEXTS, answer_key, make_trials, parse_depths, run_trial
    from quicksilver.results_io import write_atomic, write_json_atomic

    def log(msg):
        print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)

    out_json = Path(args.output)
    out_md = out_json.with_suffix(".md")
    old = json.loads(out_json.read_text()) if out_json.is_file() and not args.fresh else {}
    if args.merge:
        for path in args.merge:
            if not Path(path).is_file():
                raise BenchError(f"{path} does not exist")
            try:
                part = json.loads(Path(path).read_text())
            except json.JSONDecodeError as e:
                raise BenchError(f"{path} is not JSON ({e})") from None
            old = merge(old, part)
        args.render = True
    if args.note is not None and old:
        old.setdefault("meta", {})["note"] = args.note
    if args.ours_from and not (ROOT / args.ours_from).is_file():
        raise BenchError(f"--ours-from {args.ours_from}: no such file")
    if args.ours_from and old:
        old.setdefault("meta", {})["ours_from"] = args.ours_from
    ours_from = args.ours_from or old.get("meta", {}).get("ours_from")
    if not args.ours_from and ours_from and not (ROOT / ours_from).is_file():  # remembered from another checkout: this one's
        ours_from = "docs/results/long_context.json"
    if args.merge or args.note is not None or (args.ours_from and old):
        write_json_atomic(out_json, old)
    if args.render:
        if not old:
            raise BenchError(f"{out_json} does not exist: nothing to render")
        write_atomic(out_md, render_with_ours(old, ours_from))
        log(f"wrote {out_md}")
        return
    presses = parse_list(args.presses, PRESSES, "presses") if args.presses != "none" else []
    policies = parse_policies(args.policies) if args.policies != "none" else []
    fractions = parse_fractions(args.fractions)
    depths = parse_depths(args.depths)
    if args.trials < 1 or args.first_trial < 0:
        raise BenchError(f"--trials must be at least 1 and --first-trial at least 0, got {args.trials} and {args.first_trial}")
    if args.model != "smollm2-135m":
        raise BenchError("only the offline default model smollm2-135m is wired to the kvpress venv (a cached safetensors folder)")
    contexts = [] if args.no_needle else (args.context or list(DEFAULT_CONTEXTS))
    if any(n < 64 or n + 32 > 8192 for n in contexts):
        raise BenchError(f"--context must lie in [64, 8160] (the model has 8,192 positions; the question and answer need room), got {contexts}")
    if args.continuation_chunks < 0 or args.prefix_tokens < 128 or args.continuation_tokens < 1:
        raise BenchError("--continuation-chunks >= 0, --prefix-tokens >= 128 and --continuation-tokens >= 1 expected")

    dtype = str(parse_dtype(args.dtype, "cpu")).removeprefix("torch.")
    hf_model, tok = load_model(args.model, dtype=dtype)
    source = load_corpus(args.corpus, "test")
    # benchmarks/long_context.py's trials exactly: each context cuts its own haystack of
    # 4 * context tokens (the haystack's length fixes the offsets), so trial i here is trial i there.
    last = args.first_trial + args.trials
    trials, haystacks = [], {}
    for n in contexts:
        haystacks[n] = tokenize_documents(tok, source.documents, n * 4)
        trials += make_trials(tok, haystacks[n], [n], depths, last, args.seed)[args.first_trial :]
    index = {id(t): f"{i % args.trials + args.first_trial}" for i, t in enumerate(trials)}
    chunks = []
    if args.continuation_chunks:
        # long_context.py's chunks: consecutive windows of prefix + continuation tokens of the
        # test text, no BOS added (smollm2-135m expects none: bos_per_window is False for it).
        size = args.prefix_tokens + args.continuation_tokens
        ids = tokenize_documents(tok, source.documents, size * args.continuation_chunks)
        if ids.numel() < size * args.continuation_chunks:
            raise BenchError(f"{args.corpus} has {ids.numel()} tokens; {args.continuation_chunks} chunks need {size * args.continuation_chunks}")
        for i in range(args.continuation_chunks):
            chunk = ids[i * size : (i + 1) * size]
            chunks.append((str(i), chunk[: args.prefix_tokens], chunk[args.prefix_tokens :]))

    command = command_line([__file__, *args.argv])
    new = {"meta": {"model": args.model, "dtype": dtype, "corpus": args.corpus, "seed": args.seed, "depths": list(depths),
                    "prefix_tokens": args.prefix_tokens if chunks else None, "continuation_tokens": args.continuation_tokens if chunks else None,
                    "machine": describe(), "date": harness.now(), "commands": [command], "commit": git_commit(),
                    "ours_from": args.ours_from, "quiet": os.environ.get("QS_QUIET") == "1"},
           "versions": {**old.get("versions", {}), "torch": torch.__version__, "transformers": __import__("transformers").__version__},
           "needle": {}, "continuation": {}}

    def record_trial(t, method, tokens, kept):
        text = tok.decode(tokens)
        new["needle"].setdefault(str(t.context), {}).setdefault(method, {})[index[id(t)]] = {
            "key": t.key, "depth": t.depth, "answer": text, "correct": answer_key(text) == t.key, "kept": kept}

    def save():
        merged = merge(old, new)
        write_json_atomic(out_json, merged)
        write_atomic(out_md, render_with_ours(merged, ours_from))

    if presses and (trials or chunks or args.logit_check):
        python = ensure_venv(log)
        with tempfile.TemporaryDirectory(prefix="kvpress-side-") as tmp:
            job = {"model_path": str(offline_model_folder(args.model)), "dtype": dtype, "presses": presses, "fractions": fractions,
                   "answer_tokens": ANSWER_TOKENS,
                   "needle": [{"id": i, "ids": t.ids.tolist(), "question": t.question.tolist()} for i, t in enumerate(trials)],
                   "continuation": [{"id": i, "prefix": p.tolist(), "cont": c.tolist()} for i, (_, p, c) in enumerate(chunks)]}
            if args.logit_check:
                ids = tokenize_documents(tok, source.documents, args.logit_check)
                ours = {}
                for dt in ("float32", "bfloat16"):
                    m32, _ = load_model(args.model, dtype=dt)
                    with torch.inference_mode():
                        logits = Engine(m32)(ids).logits.float().numpy()
                    ours[dt] = str(Path(tmp) / f"ours_{dt}.npy")
                    np.save(ours[dt], logits)
                job["logit_check"] = {"ids": ids.tolist(), "ours": ours}
            if args.verify_tokens:
                job["verify_ids"] = (trials[0].ids if trials else tokenize_documents(tok, source.documents, args.verify_tokens))[: args.verify_tokens].tolist()
            log(f"kvpress worker: {len(trials)} trials, {len(chunks)} chunks, presses {presses} at {fractions}")
            res = run_worker(python, job, Path(tmp), log)
        new["versions"].update({"kvpress": res["versions"]["kvpress"], "transformers_kvpress": res["versions"]["transformers"],
                                "torch_kvpress": res["versions"]["torch"]})
        for key in ("logit_check", "verified", "verified_tokens"):
            if key in res:
                new[key] = res[key]
        for row in res["needle"]:
            t = trials[row["id"]]
            for name, tokens in row["answers"].items():
                rule, _, f = name.partition("@")
                record_trial(t, method_name("kvpress", rule, float(f) if f else None), tokens, row["kept"][name])
        for row in res["continuation"]:
            cid = chunks[row["id"]][0]
            for name, nll in row["nll"].items():
                rule, _, f = name.partition("@")
                new["continuation"].setdefault(method_name("kvpress", rule, float(f) if f else None), {})[cid] = {
                    "nll": nll, "tokens": args.continuation_tokens, "kept": row["kept"][name]}
        save()
        if not res["complete"]:
            raise BenchError(f"the kvpress worker stopped early; what it measured ({len(res['needle'])} trials, "
                             f"{len(res['continuation'])} chunks) is saved in {out_json}")

    # Our stock model: on the continuation chunks always (our ΔPPL is against it); on the
    # trials only if asked (its logits equal kvpress's stock model's, see --logit-check).
    configs = [(STOCK, None)] if policies and (args.our_stock or chunks) else []
    configs += [(r, f) for r in policies for f in fractions]
    for rule, f in configs:
        t0 = time.time()
        for t in trials if rule != STOCK or args.our_stock else []:
            engine = Engine(hf_model) if rule == STOCK else make_engine(hf_model, tok, policy_config(rule, f, t.context), args.corpus)
            tokens, kept = run_trial(engine, t)
            record_trial(t, method_name("quicksilver", rule, f), tokens, 1.0 if rule == STOCK else kept)
        for cid, p, c in chunks:
            engine = Engine(hf_model) if rule == STOCK else make_engine(hf_model, tok, policy_config(rule, f, p.numel()), args.corpus)
            nll, kept = score_chunk(engine, p, c)
            new["continuation"].setdefault(method_name("quicksilver", rule, f), {})[cid] = {
                "nll": nll, "tokens": c.numel(), "kept": 1.0 if rule == STOCK else kept}
        log(f"quicksilver {rule}{'' if f is None else f'@{f:g}'}: {len(trials)} trials, {len(chunks)} chunks in {time.time() - t0:.0f} s")
        save()  # after every rule, so a killed run keeps what it measured
    save()
    log(f"wrote {out_json} and {out_md}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(*argv[1:3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, action="append", help="needle context (repeatable); default 2048, 4096, 7680")
    p.add_argument("--trials", type=int, default=10, help="trials per context (default 10)")
    p.add_argument("--first-trial", type=int, default=0, help="skip the first trials (to add trials to a table in chunks)")
    p.add_argument("--depths", default=None, help="needle depths, as quicksilver needle (default 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default="wiki", help="haystack and continuation text: wiki or news (test split)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (both sides run it)")
    p.add_argument("--fractions", default="0.25,0.5", help="kept fractions (kvpress compression_ratio = 1 - F)")
    p.add_argument("--presses", default="all", help=f"kvpress presses: all, none or a subset of {','.join(PRESSES)}")
    p.add_argument("--policies", default="all", help=f"our rules: all, none or a subset of {','.join(POLICIES)}, each optionally +SETTING=VALUE of kv (quest+page_size=8)")
    p.add_argument("--our-stock", action="store_true", help="also run the stock model through the quicksilver engine (kvpress's venv always does)")
    p.add_argument("--no-needle", action="store_true", help="skip the pass-key trials")
    p.add_argument("--continuation-chunks", type=int, default=0, help="continuation chunks to score (default 0: none)")
    p.add_argument("--prefix-tokens", type=int, default=3584)
    p.add_argument("--continuation-tokens", type=int, default=512)
    p.add_argument("--logit-check", type=int, default=0, help="compare stock logits of both sides on this many tokens (0: skip)")
    p.add_argument("--verify-tokens", type=int, default=0, help="check one prefill = each press's context manager on this many tokens (0: skip)")
    p.add_argument("--render", action="store_true", help="only redraw the markdown from the JSON")
    p.add_argument("--fresh", action="store_true", help="replace --output instead of merging into it (another dtype or machine)")
    p.add_argument("--ours-from", metavar="JSON", help="take our columns (window and quest+page_size=2+block_pages=16 at 25%% and 50%%, "
                   "and the stock model) from benchmarks/long_context.py's results (read at render time, never written), e.g. "
                   "docs/results/long_context.json; remembered in --output")
    p.add_argument("--note", help="a sentence shown above the table (e.g. what a partial run lacks); with --merge or --render")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge these results files (from runs with other --output) into --output, then redraw")
    p.add_argument("--output", default=str(ROOT / "docs" / "results" / "kvpress.json"), help="merged results JSON (the .md sits beside it)")
    args = p.parse_args(argv)
    args.argv = argv
    try:
        drive(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a QuicksilverError from the API (bad corpus, too short a haystack): one line too
        if type(e).__name__ != "QuicksilverError":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
