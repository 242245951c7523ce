"""Why Contextual Token Fusion hurts, and whether the ``prefix`` rule stops it: writes docs/results/fusion_why.md.

For each corpus's test split, every window runs the stock model once (its states at the
fusion layer give the rule's decisions; fusion changes nothing before that layer) and the
engine with the ``fusion`` preset under the old rule (``prefix=0``: similarity alone) and
the new one (``prefix=2``). It reports which tokens fused, whether they repeat their
representative's token id, how much of the perplexity cost sits on the fused rows
themselves, and the measured cost and FLOP saving of each rule. Usage:

    python benchmarks/fusion_why.py [--corpora code news wiki pydoc] [--tokens 2048] [--window 512] [--out docs/results]
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.adapters import arch_spec  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.corpora import load_corpus  # noqa: E402
from quicksilver.engine import Engine  # noqa: E402
from quicksilver.evaluate import tokenize_documents, window_plan  # noqa: E402
from quicksilver.flops import dense_forward_flops  # noqa: E402
from quicksilver.results_io import write_atomic  # noqa: E402

RULES = {"similarity alone (prefix 0, the old rule)": 0, "prefix 2 (the new rule)": 2}


def nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]


def measure(model, tok, corpus: str, tokens: int, window: int) -> dict:
    ids = tokenize_documents(tok, load_corpus(corpus, "test").documents, tokens)
    spec = arch_spec(model.config)
    engines = {name: Engine(model, Config.from_dict({**Config.preset("fusion").to_dict(), "fusion": {
        **Config.preset("fusion").to_dict()["fusion"], "prefix": prefix}})) for name, prefix in RULES.items()}
    layer = Config.preset("fusion").fusion.layer
    out = {name: {"nll": 0.0, "member_nll": 0.0, "members": 0, "same_id": 0, "flops": 0, "back": 0, "pairs": collections.Counter(),
                  "ran": 0} for name in RULES}
    base_nll, base_flops, count = 0.0, 0, 0
    for w in window_plan(ids.numel(), window, window - 1, bos=False):
        ctx = ids[w.begin:w.end]
        rows = torch.arange(w.score_from - w.begin - 1, ctx.numel() - 1)
        targets = ctx[rows + 1]
        with torch.inference_mode():
            stock = model(ctx[None], output_hidden_states=True)
        base = nll_rows(stock.logits[0][rows], targets)
        base_nll += float(base.sum())
        base_flops += dense_forward_flops(spec, ctx.numel(), head_rows=rows.numel())["total"]
        count += rows.numel()
        pos = torch.arange(ctx.numel())
        for name, engine in engines.items():
            o = out[name]
            rep = engine.config.fusion.representatives(stock.hidden_states[layer][0], pos)
            members = (rep != pos).nonzero()[:, 0]
            if members.numel() == 0:  # nothing fuses: the engine computes what the stock model does (tested identity)
                o["nll"] += float(base.sum())
                o["flops"] += dense_forward_flops(spec, ctx.numel(), head_rows=rows.numel())["total"] \
                    + engine.config.fusion.probe_flops(ctx.numel(), spec.d_model)
                continue
            run = engine(ctx, rows)
            o["ran"] += 1
            nll = nll_rows(run.logits, targets)
            o["nll"] += float(nll.sum())
            o["flops"] += run.ledger.total_flops
            scored = members[(members >= rows[0]) & (members <= rows[-1])]
            o["member_nll"] += float((nll - base)[scored - rows[0]].sum())
            o["members"] += members.numel()
            o["same_id"] += int((ctx[members] == ctx[rep[members]]).sum())
            o["back"] += int((members - rep[members]).sum())
            o["pairs"].update(tok.decode([int(t)]) for t in ctx[members])
    result = {"corpus": corpus, "tokens": count, "rules": {}}
    for name, o in out.items():
        lost = o["nll"] - base_nll
        result["rules"][name] = {
            "relative_delta_perplexity": math.exp(lost / count) - 1,
            "flop_reduction": 1 - o["flops"] / base_flops,
            "fused": o["members"],
            "same_id": o["same_id"],
            "mean_distance": o["back"] / max(o["members"], 1),
            "nats_lost": lost,
            "nats_lost_on_fused_rows": o["member_nll"],
            "top_tokens": o["pairs"].most_common(6),
            "windows_run": o["ran"],
        }
    return result


def markdown(results: list[dict], args, meta: dict) -> str:
    lines = [
        header(meta) + "; "
        f"the `code` and `pydoc` text is this Python's standard library; smollm2-135m float32, the `fusion` preset (layer 12, cos >= 0.92, 4 candidates, delta "
        f"output) with each rule, test splits, first {args.tokens} tokens, {args.window}-token windows, each against the stock "
        f"model on the same windows. Windows where a rule fused nothing are the stock model's (the engine's off-identity) and are "
        f"not rerun.",
        "",
        "| corpus | rule | fused tokens | same token id as representative | mean distance back | share of the cost on fused rows "
        "| rel. ΔPPL | FLOP reduction | most fused tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, x in r["rules"].items():
            share = f"{x['nats_lost_on_fused_rows'] / x['nats_lost'] * 100:.0f}%" if x["nats_lost"] > 0.5 else "—"
            same = f"{x['same_id']}/{x['fused']}" if x["fused"] else "—"
            top = ", ".join(f"`{t!r}` {n}" for t, n in x["top_tokens"]) or "—"
            lines.append(f"| {r['corpus']} | {name} | {x['fused']} of {r['tokens']} ({x['fused'] / r['tokens'] * 100:.1f}%) | {same} "
                         f"| {x['mean_distance']:.1f} | {share} | {x['relative_delta_perplexity'] * 100:+.2f}% "
                         f"| {x['flop_reduction'] * 100:.2f}% | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", nargs="+", default=["code", "news", "wiki", "pydoc"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)  # before the long run, not after it
    model, tok = load_model("smollm2-135m")
    results = []
    for corpus in args.corpora:
        t0 = time.time()
        results.append(measure(model, tok, corpus, args.tokens, args.window))
        print(f"{corpus}: " + "; ".join(f"{n}: {x['relative_delta_perplexity'] * 100:+.2f}% ({x['fused']} fused)"
                                         for n, x in results[-1]["rules"].items()) + f" ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    write_atomic(Path(args.out) / "fusion_why.md", markdown(results, args, run_meta()))


if __name__ == "__main__":
    main()
