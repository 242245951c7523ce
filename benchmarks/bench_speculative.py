"""Speculative decoding benchmark: lossless drafting against HF ``generate`` and HF prompt lookup.

Prompts: benchmarks/prompts/speculative.json (8 open-ended wiki openings; 24 input-grounded
prompts, 8 each that repeat, lightly edit or continue a 300-600 token wiki passage, chat template
applied). For each dtype and batch size (1 and 8) and each prompt group, in turn: HF
``generate`` (greedy, same dtype), HF assisted generation with ``prompt_lookup_num_tokens=10``
(batch 1 only: HF runs it at batch 1 only), the engine with speculation off, and the engine
with each draft setting. EOS does not stop anyone, so every side produces exactly
``--new-tokens`` tokens. Reported per (dtype, batch, prompt kind, system): tok/s and the ratio
to HF ``generate`` of the same run, acceptance rate, tokens per verify step, tokens by
source, and token agreement with the engine's own plain greedy output (first divergence).
In float32 the speculative outputs must equal plain greedy on every prompt; in bfloat16 a
k-token verify and k one-token steps may round differently, and the table says how often.

    python benchmarks/bench_speculative.py [--quick] [--threads 1] [--dtypes float32,bfloat16] [--out docs/results]

A full run takes about half an hour on 2 cores; ``--kinds``, ``--batches`` and ``--dtypes`` run a
piece of it, and ``--merge`` adds the piece's rows to the JSON already in ``--out`` (replacing
rows of the same dtype, batch, kind and system) before writing both files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (greedy_agreement, header, hf_generate, interleaved, load_results, merge_meta, merge_rows,  # noqa: E402
                     pad_id, run_meta, write_results)
from quicksilver import generate  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.engine import Engine  # noqa: E402
from quicksilver.results_io import write_atomic  # noqa: E402

# name -> speculative settings (None: the engine with speculation off)
SYSTEMS = {
    "off": None,
    "lossless": {"enabled": True, "sources": "lookup,int8"},
    "lookup": {"enabled": True, "sources": "lookup"},
    "int8": {"enabled": True, "sources": "int8"},
    "int4": {"enabled": True, "sources": "int4"},
}
KINDS = ("open", "repeat", "edit", "continue")


def load_prompts(tok, quick: bool, per_kind: int | None = None) -> list[dict]:
    prompts = json.loads((HERE / "prompts" / "speculative.json").read_text(encoding="utf-8"))
    for p in prompts:
        if p["chat"]:
            text = tok.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False, add_generation_prompt=True)
            p["ids"] = tok(text, add_special_tokens=False).input_ids
        else:
            p["ids"] = tok(p["text"]).input_ids
    per_kind = 2 if quick else per_kind
    if per_kind:  # the first prompts of each kind
        prompts = [p for k in KINDS for p in [q for q in prompts if q["kind"] == k][:per_kind]]
    return prompts


def run_dtype(dtype: str, args, log) -> list[dict]:
    model, tok = load_model("smollm2-135m", dtype=dtype)
    model.generation_config.eos_token_id = None
    prompts = load_prompts(tok, args.quick, args.prompts)
    # On a CPU a float32 model has no fast low-bit kernel: the int8/int4 drafts are bfloat16 systems
    # (the lossless preset leaves them out in float32 by itself; see speculative.usable_sources).
    # --force-drafts runs them anyway: the float32 equality check of the low-bit drafts (slow).
    skip = {"int8", "int4"} if dtype == "float32" and not args.force_drafts else set()
    engines = {name: Engine(model, Config.from_dict({"speculative": s} if s else {})) for name, s in SYSTEMS.items()
               if name in args.systems and name not in skip}
    rows = []
    with torch.inference_mode():  # kernel choices of every row bucket a verify pass can reach, before any timing
        for n in (1, 8, 24, 64, 160, 512):  # 512: the prefill bucket
            engines.get("off", Engine(model))(torch.arange(n) % 1000)
    for batch in args.batches:
        for kind_no, kind in enumerate(args.kinds):
            group_all = [p["ids"] for p in prompts if p["kind"] == kind]
            groups = [group_all[i : i + batch] for i in range(0, len(group_all), batch)]
            if batch > 1 and len(group_all) < batch:  # fill a batch of 8 by repeating the kind's prompts
                groups = [(group_all * batch)[:batch]]
            # Warm-up (kernel choices, allocator) on the first group, a few tokens: in full for the batch size's first
            # kind; for the later kinds on the group's prompts cut to 16 tokens: each system's path once more, without
            # their prefills of about 600 tokens a prompt (8 prompts at batch 8). The warm-ups took 128 of 267 s of a
            # profiled run at 8 new tokens (2026-12-04), most of them in those prefills; make results' step took 9.1 min.
            warm = groups[0] if kind_no == 0 else [p[:16] for p in groups[0]]
            hf_generate(model, warm, 4, pad_id(tok))
            for e in engines.values():
                generate(e, [torch.tensor(p) for p in warm], 12)
            systems = ["hf"] + (["hf-lookup"] if batch == 1 else []) + list(engines)

            def side(s):
                if s.startswith("hf"):
                    extra = {"prompt_lookup_num_tokens": 10} if s == "hf-lookup" else {}
                    return lambda group: (*hf_generate(model, group, args.new_tokens, pad_id(tok), **extra), None)
                engine = engines[s]

                def run(group):
                    r = generate(engine, [torch.tensor(p) for p in group], args.new_tokens)
                    return r.tokens, r.total_seconds, getattr(r, "speculative", None)
                return run

            # systems alternate group by group, and so does which of them runs first
            runs = interleaved({s: side(s) for s in systems}, groups)
            res = {s: {"tokens": [t for toks, _, _ in runs[s] for t in toks], "seconds": sum(sec for _, sec, _ in runs[s]),
                       "spec": [x for _, _, x in runs[s] if x]} for s in systems}
            hf_tps = sum(map(len, res["hf"]["tokens"])) / res["hf"]["seconds"]
            plain = res["off"]["tokens"] if "off" in res else res["hf"]["tokens"]
            for s in systems:
                n = sum(map(len, res[s]["tokens"]))
                agree, first = greedy_agreement(res[s]["tokens"], plain)
                row = {"dtype": dtype, "batch": batch, "kind": kind, "system": s, "prompts": len(group_all),
                       "new_tokens": n, "tokens_per_s": n / res[s]["seconds"], "speed_ratio": n / res[s]["seconds"] / hf_tps,
                       "agreement_with_plain": agree, "first_divergence": first}
                if res[s]["spec"]:
                    specs = res[s]["spec"]
                    drafted = sum(x["drafted"] for x in specs)
                    accepted = sum(x["accepted"] for x in specs)
                    steps = sum(x["verify_steps"] for x in specs)
                    row.update(acceptance_rate=accepted / drafted if drafted else 0.0, tokens_per_step=n / steps if steps else 0.0,
                               by_source={name: {k: sum(x["sources"][name][k] for x in specs) for k in ("drafted", "accepted", "emitted", "steps")}
                                          for name in specs[0]["sources"]})
                rows.append(row)
                log(f"{dtype} batch {batch} {kind:8s} {s:9s}: {row['tokens_per_s']:6.1f} tok/s ({row['speed_ratio']:.2f}x HF), "
                    f"agreement {agree:.1%}" + (f", acceptance {row['acceptance_rate']:.0%}, {row['tokens_per_step']:.2f} tok/step"
                                               if "acceptance_rate" in row else ""))
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    what = (f"1-minute load average at each start: {', '.join(map(str, meta.get('load', [])))}; smollm2-135m, "
            f"{meta['new_tokens']} new tokens per prompt, greedy, EOS ignored. {meta['note']}")
    lines = [header(meta, what), "",
             "| dtype | batch | prompts | system | tok/s | vs HF generate | agreement with plain greedy | first divergence "
             "| acceptance | tokens / verify | accepted by source |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        by = ", ".join(f"{k} {v['accepted']}/{v['drafted']}" for k, v in r.get("by_source", {}).items() if v["steps"])
        acc = f"{r['acceptance_rate']:.0%}" if "acceptance_rate" in r else ""
        tps = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else ""
        first = "none" if r["first_divergence"] is None else r["first_divergence"]
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['kind']} ({r['prompts']}) | {r['system']} | {r['tokens_per_s']:.1f} "
                     f"| {r['speed_ratio']:.2f}x | {r['agreement_with_plain']:.1%} | {first} | {acc} | {tps} | {by} |")
    return "\n".join(lines) + "\n"


def pass_costs(args, log) -> str:
    """What one pass costs at batch 1 (bfloat16, 500 cached tokens): the verifier over 1..33 rows, a draft pass of each model source."""
    from quicksilver.cache import SequenceCache
    from quicksilver.decoding import prefill
    from quicksilver.decoding.speculative import draft_engine

    model, _ = load_model("smollm2-135m", dtype="bfloat16")
    base = Engine(model, Config())
    engines = {"verifier (bf16)": base, "int8 draft": draft_engine(base, "int8"), "int4 draft": draft_engine(base, "int4")}
    ids = torch.randint(0, 40000, (500,), generator=torch.Generator().manual_seed(0))
    rows = {name: (1, 2, 3, 5, 9, 17, 33) if e is base else (1,) for name, e in engines.items()}
    times: dict = {}
    with torch.inference_mode():
        caches = {}
        for name, e in engines.items():
            caches[name] = SequenceCache(base.spec.n_layers, capacity=600)
            prefill(e, ids, caches[name])
            for k in rows[name]:  # warm-up: kernel choices for these row counts
                e.run(ids[:k], torch.arange(500, 500 + k), [(0, k)], [caches[name]])
                caches[name].truncate(500)
        for _ in range(7):  # interleaved repetitions
            for name, e in engines.items():
                for k in rows[name]:
                    t0 = time.perf_counter()
                    e.run(ids[:k], torch.arange(500, 500 + k), [(0, k)], [caches[name]])
                    times.setdefault((name, k), []).append(time.perf_counter() - t0)
                    caches[name].truncate(500)
    one = sorted(times[("verifier (bf16)", 1)])[3]
    lines = [header(run_meta(), "one engine pass at batch 1 after a 500-token prefill, bfloat16, median of 7 interleaved runs."), "",
             "| pass | rows | ms | vs one verifier row |", "|---|---|---|---|"]
    for (name, k), ts in times.items():
        ms = sorted(ts)[3]
        lines.append(f"| {name} | {k} | {ms * 1e3:.1f} | {ms / one:.2f}x |")
        log(lines[-1])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="two prompts per kind, 32 new tokens")
    ap.add_argument("--prompts", type=int, default=None, help="prompts of each kind (default: all 8; 2 with --quick)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"prompt kinds among {', '.join(KINDS)}")
    ap.add_argument("--force-drafts", action="store_true",
                    help="run the int8/int4 drafts in float32 too (slow; it checks their equality with plain greedy)")
    ap.add_argument("--merge", action="store_true", help="add these rows to the speculative.json already in --out")
    ap.add_argument("--costs", action="store_true", help="only measure pass costs (docs/results/speculative_costs.md)")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from quicksilver import kernels

    # Kernel choices measured in this process (during the warm-ups), not read from the shared cache file.
    kernels.set_kernel_table(kernels.KernelTable(None))
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.prompts is not None and args.prompts < 1:
        sys.exit(f"error: --prompts must be at least 1, got {args.prompts}")
    args.systems = args.systems.split(",")
    args.kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in KINDS for k in args.kinds):
        sys.exit(f"error: --kinds takes {', '.join(KINDS)}")
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.costs:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out) / "speculative_costs.md", pass_costs(args, log))
        return
    meta = run_meta(new_tokens=args.new_tokens,
                    note="Ratios are within one run (the systems alternate prompt group by prompt group, and which of them "
                         "runs first rotates)." + (" Quick run: two prompts per kind." if args.quick else ""))
    meta["load"] = [meta["load_average"]]
    rows = []
    for dtype in args.dtypes.split(","):
        rows += run_dtype(dtype, args, log)
    out = Path(args.out)
    old = load_results(out / "speculative.json") if args.merge else {}
    if old:
        if old["meta"]["new_tokens"] != args.new_tokens:
            sys.exit(f"error: --merge into a run of {old['meta']['new_tokens']} new tokens, not {args.new_tokens}")
        rows = merge_rows(old["rows"], rows, lambda r: (r["dtype"], r["batch"], r["kind"], r["system"]))
        order = {k: i for i, k in enumerate(KINDS)}
        rows.sort(key=lambda r: (r["dtype"] != "bfloat16", r["batch"], order[r["kind"]]))
        meta = {**merge_meta(old["meta"], meta), "load": old["meta"].get("load", []) + meta["load"]}
    write_results(out, "speculative", {"meta": meta, "rows": rows}, markdown(meta, rows))
    bad = [r for r in rows if r["dtype"] == "float32" and r["system"] in SYSTEMS and r["agreement_with_plain"] < 1]
    for r in bad:
        log(f"NOT EQUAL in float32: {r['system']} batch {r['batch']} {r['kind']} (first divergence {r['first_divergence']})")


if __name__ == "__main__":
    main()
