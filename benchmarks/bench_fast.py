"""The `fast` preset's promise and prefill speed, and what bfloat16 costs against float32.

For each corpus (`wiki`, `news`; test splits, text the preset was never tuned on) and each
window (512 and 4,096 tokens): the stock model in float32, the stock model in the chosen
dtype, and each preset in that dtype against the stock model in the same dtype,
interleaved window by window in one run. Reports perplexity (and its relative change),
prefill tokens/s, the speedup against the stock model in the same dtype and against the
stock model in float32 (what a user gets without choosing a dtype). The decode side of
`fast` is in the decode table (benchmarks/bench_decode.py).

    python benchmarks/bench_fast.py [--out docs/results] [--tokens 8192] [--presets off,fast]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta, write_results  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.evaluate import evaluate_model  # noqa: E402
from quicksilver.models import parse_dtype  # noqa: E402

PROMISE = 0.01  # the fast preset's budget: relative perplexity increase on text it was not tuned on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--presets", default="off,fast")
    ap.add_argument("--corpora", default="wiki,news")
    ap.add_argument("--windows", default="512,4096")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    fp32 = load_model("smollm2-135m", dtype="float32")
    low = load_model("smollm2-135m", dtype=dtype) if dtype != torch.float32 else fp32
    name = str(dtype).removeprefix("torch.")
    rows = []
    for corpus in args.corpora.split(","):
        for window in map(int, args.windows.split(",")):
            common = dict(corpus=corpus, split="test", window=window, max_tokens=args.tokens)
            # A second float32 stock run only where the preset's dtype is another (float32 here: the same-run baseline is it).
            ref32 = evaluate_model("smollm2-135m", loaded=fp32, dtype="float32", **common) if low is not fp32 else None
            for preset in args.presets.split(","):
                r = evaluate_model("smollm2-135m", loaded=low, dtype=name, config=Config.preset(preset), **common)
                base = r.get("baseline", r)
                row = {"corpus": corpus, "window": window, "preset": preset, "dtype": name,
                       "perplexity": r["perplexity"], "stock_perplexity": base["perplexity"],
                       "stock_fp32_perplexity": (ref32 or base)["perplexity"],
                       "relative_delta": r["perplexity"] / base["perplexity"] - 1,
                       "tokens_per_s": r["tokens_per_second"], "stock_tokens_per_s": base["tokens_per_second"],
                       "stock_fp32_tokens_per_s": (ref32 or base)["tokens_per_second"],
                       "speedup": base["wall_seconds"] / r["wall_seconds"] if "baseline" in r else 1.0,
                       "top1_agreement": r.get("top1_agreement", 1.0)}
                row["vs_fp32"] = row["tokens_per_s"] / row["stock_fp32_tokens_per_s"] if ref32 else row["speedup"]
                row["held"] = row["relative_delta"] <= PROMISE if preset == "fast" else None
                rows.append(row)
                print(f"{corpus} w{window} {preset}: ppl {row['perplexity']:.3f} ({row['relative_delta']:+.2%}), "
                      f"{row['speedup']:.2f}x same dtype, {row['vs_fp32']:.2f}x fp32", file=sys.stderr, flush=True)
    meta = run_meta()
    two = low is not fp32  # a float32 stock column of its own only where the preset runs in another dtype
    head = header(meta, f"smollm2-135m, test splits (never tuned on), first {args.tokens} tokens, prefill (teacher-forced) "
              f"windows; each preset against the stock model in {name} interleaved window by window"
              + ("; the stock model in float32 in the same process." if two else "."))
    lines = [head, "", "| corpus | window | preset | " + ("PPL float32 stock | " if two else "") + f"PPL {name} stock | PPL preset "
             f"| rel. change | top-1 agree | tok/s | speedup vs stock {name} | " + ("vs stock float32 | " if two else "") + "promise (1%) |",
             "|---" * (12 if two else 10) + "|"]
    for r in rows:
        held = "" if r["held"] is None else ("held" if r["held"] else "**missed**")
        lines.append(f"| {r['corpus']} | {r['window']} | {r['preset']} | " + (f"{r['stock_fp32_perplexity']:.3f} | " if two else "")
                     + f"{r['stock_perplexity']:.3f} | {r['perplexity']:.3f} | {r['relative_delta']:+.2%} | {r['top1_agreement']:.1%} "
                     f"| {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | " + (f"{r['vs_fp32']:.2f}x | " if two else "") + f"{held} |")
    write_results(Path(args.out), "fast", {"header": head, "meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
