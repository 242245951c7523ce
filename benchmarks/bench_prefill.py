"""Where a prefill's milliseconds go: the peers table's 1,024-token prompt through `off`, by kind of work.

For each dtype, the default model with every mechanism off prefills the peers benchmark's prompt
(the wiki test split's text from its 9th article on, ``--tokens`` long) through ``generate`` (one
new token, as ``bench_peers.py`` times it):

- time to the first token, median of ``--reps`` (after two warm-ups);
- one more prefill under ``torch.profiler``: the self time of torch's matmul ops (``aten::mm``,
  ``addmm``, ``bmm``), of every other torch op, and the rest of the wall time (the native causal
  attention, called through ctypes, and Python);
- the causal attention alone: the engine's attention kernel on the prompt's shapes, once per layer;
- the matmuls' rate (2 x rows x weights of every decoder matrix, the head on the last row only)
  against torch's own matmul at the model's widest layer shape, timed in the same run: how close
  the prefill's matmuls come to what this machine's matmul reaches.

    python benchmarks/bench_prefill.py [--dtypes float32,bfloat16] [--tokens 1024] [--reps 5]
        [--threads 2] [--out docs/results]

Writes ``prefill.json`` and ``prefill.md`` into ``--out`` (command, machine and commit in the header).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

MODEL = "smollm2-135m"
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(dtype: str, tokens: int, reps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_peers import inputs
    from quicksilver import Config, Engine, generate, load_model
    from quicksilver.attn_kernels import causal_attention

    model, tok = load_model(MODEL, dtype=dtype)
    model.generation_config.eos_token_id = None
    ids = torch.tensor(inputs(tok, tokens)[1])
    engine = Engine(model, Config.preset("off"))
    with torch.inference_mode():
        for _ in range(2):
            generate(engine, [ids], 1)
        ttft = statistics.median(generate(engine, [ids], 1).time_to_first_token for _ in range(reps))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            generate(engine, [ids], 1)
            profiled = time.perf_counter() - t0
    ops = prof.key_averages()
    matmul_us = sum(e.self_cpu_time_total for e in ops if e.key in MATMUL_OPS)
    torch_us = sum(e.self_cpu_time_total for e in ops if e.key.startswith("aten::"))
    cfg = model.config
    L, H, Hkv, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    mats = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    head = model.get_output_embeddings().weight
    matmul_flops = 2 * tokens * sum(m.weight.numel() for m in mats) + 2 * head.numel()
    attn_flops = L * H * tokens * (tokens + 1) // 2 * hd * 4
    tdtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(tokens, h, hd, generator=g).to(tdtype) for h in (H, Hkv, Hkv))
    with torch.inference_mode():
        attn_ms = L * _median_ms(lambda: causal_attention(q, k, v, hd ** -0.5), reps)
        widest = max(mats, key=lambda m: m.weight.numel()).weight
        x = torch.randn(tokens, widest.shape[1], generator=g).to(tdtype)
        peak_ms = _median_ms(lambda: torch.nn.functional.linear(x, widest), 3 * reps)
    return {"dtype": dtype, "tokens": tokens, "ttft_ms": 1e3 * ttft, "tokens_per_s": tokens / ttft,
            "profiled_ms": 1e3 * profiled, "matmul_ms": matmul_us / 1e3, "other_torch_ms": (torch_us - matmul_us) / 1e3,
            "rest_ms": 1e3 * profiled - torch_us / 1e3, "attention_ms": attn_ms,
            "matmul_gflops": matmul_flops / 1e9, "matmul_gflop_s": matmul_flops / matmul_us / 1e3,
            "attention_gflop_s": attn_flops / attn_ms / 1e6, "widest_shape": f"{tokens}x{widest.shape[1]} @ {widest.shape[1]}x{widest.shape[0]}",
            "widest_gflop_s": 2 * tokens * widest.numel() / peak_ms / 1e6}


def render(data: dict) -> str:
    m = data["meta"]
    what = (f"{MODEL}, every mechanism off, one {m['tokens']:,}-token prompt (the peers table's) through `generate` (one new "
            f"token); time to first token: median of {m['reps']}; the split by kind of work: one more prefill under "
            "torch.profiler (its wall time is the `profiled` column: the profiler adds a little)")
    lines = [harness.header(m, what), "",
             "| dtype | tokens/s | first token ms | profiled ms | torch matmuls ms | other torch ops ms | rest ms (native attention, Python) "
             "| causal attention alone ms | matmul GFLOP | matmul GFLOP/s | torch at the widest layer GFLOP/s | attention GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['dtype']} | {r['tokens_per_s']:,.0f} | {r['ttft_ms']:.0f} | {r['profiled_ms']:.0f} | {r['matmul_ms']:.0f} "
                     f"| {r['other_torch_ms']:.0f} | {r['rest_ms']:.0f} | {r['attention_ms']:.0f} | {r['matmul_gflops']:.0f} "
                     f"| {r['matmul_gflop_s']:.0f} | {r['widest_gflop_s']:.0f} | {r['attention_gflop_s']:.0f} |")
    widest = data["rows"][0]["widest_shape"] if data["rows"] else ""
    lines += ["", f"`torch at the widest layer`: torch's own matmul on one {widest} product (the model's largest matrix) "
              "in the same run, what this machine's matmul reaches at a good shape. `causal attention alone`: the engine's "
              "attention kernel on random inputs of the prompt's shapes, once per layer (it runs inside `rest` or `other "
              "torch ops`, by which kernel the measured dispatch chose)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    import torch

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad or not dtypes or args.tokens < 2 or args.reps < 1 or args.threads < 1:
        sys.exit("error: --dtypes takes float32 and/or bfloat16, --tokens at least 2, --reps and --threads at least 1")
    torch.set_num_threads(args.threads)
    meta = harness.run_meta(tokens=args.tokens, reps=args.reps)
    from bench_peers import BenchError
    from quicksilver import QuicksilverError

    rows = []
    for d in dtypes:
        try:
            rows.append(measure(d, args.tokens, args.reps))
        except (BenchError, QuicksilverError) as e:
            sys.exit(f"error: {e}")
        print(f"{d}: {rows[-1]['tokens_per_s']:,.0f} tok/s, matmuls {rows[-1]['matmul_ms']:.0f} ms at "
              f"{rows[-1]['matmul_gflop_s']:.0f} GFLOP/s", flush=True)
    data = {"meta": meta, "rows": rows}
    harness.write_results(Path(args.out), "prefill", data, render(data))
    print(render(data))


if __name__ == "__main__":
    main()
