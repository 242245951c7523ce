"""Issue #10's last kernel candidate: a ``torch.compile``d dequantize-matmul for int8 weights.

Inductor turns ``x @ (codes * scale).T`` into generated C++; the question is whether that
comes near the kernels the dispatch already has. For each decoder linear shape of the default
model, int8 codes with one scale per output channel, bfloat16 activations, at 1 / 8 / 64 / 512
rows: microseconds of the compiled function (compiled once per row count, outside the timing)
against every kernel of the measured dispatch (``quicksilver.kernels``) on the same weight,
weights warm in cache for all of them (a like-for-like comparison; ``bench_kernels.py`` has
the cold, decode-step figures). It computes the same function as ``dequant`` (tested against
it here: the relative error of its output). Writes ``compile_dequant.md``.

    python benchmarks/compile_dequant.py [--out docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta  # noqa: E402
from quicksilver import kernels as K  # noqa: E402
from quicksilver.adapters import adapter_for  # noqa: E402
from quicksilver.models import load_model  # noqa: E402
from quicksilver.quant import quantize_int8  # noqa: E402
from quicksilver.results_io import write_atomic  # noqa: E402


def dequant_matmul(x, codes, scales):
    """The int8 weight dequantized in the activations' dtype, then one matmul (what inductor compiles)."""
    return F.linear(x, codes.to(x.dtype) * scales.to(x.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    model, _ = load_model("smollm2-135m", dtype="bfloat16")
    lins = adapter_for(model).layers[0].linears()
    shapes = {"q/o": lins["q"].weight, "k/v": lins["k"].weight, "gate/up": lins["gate"].weight, "down": lins["down"].weight}
    for limit in ("cache_size_limit", "recompile_limit"):  # 16 static graphs: over dynamo's default of 8
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    compiled = torch.compile(dequant_matmul, dynamic=False)
    rows_out, compile_s = [], 0.0
    for name, weight in shapes.items():
        qw = quantize_int8(weight, None)
        w = K.NestedWeight(qw.codes, qw.scales, None)
        for n in (1, 8, 64, 512):
            x = torch.randn(n, weight.shape[1], dtype=torch.bfloat16)
            t0 = time.perf_counter()
            y = compiled(x, w.codes, w.scales)
            compile_s += time.perf_counter() - t0
            ref = K.KERNELS[8]["dequant"][0](w, x)
            same = float((y.float() - ref.float()).norm() / ref.float().norm())  # relative error, bf16 rounding
            times = {"compiled": K.time_call(lambda: compiled(x, w.codes, w.scales), reps=50, budget_s=0.5) * 1e6}
            for k in K.candidates(w, 8, torch.bfloat16):
                run = K.KERNELS[8][k][0]
                times[k] = K.time_call(lambda: run(w, x), reps=50, budget_s=0.5) * 1e6
            rows_out.append((name, tuple(weight.shape), n, times, same))
    names = sorted({k for *_, t, _ in rows_out for k in t if k != "compiled"})
    head = header(run_meta(), "int8 codes, one scale per output channel, bfloat16 activations, weights warm in cache, medians in "
                              f"microseconds. Compiling took {compile_s:.1f} s in all (16 shapes x row counts).")
    lines = [head, "", "| linear | shape | rows | compiled | " + " | ".join(names) + " | compiled / fastest other | relative error vs dequant |",
             "|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    for name, shape, n, t, same in rows_out:
        best = min(t[k] for k in names if k in t)
        cells = " | ".join(f"{t[k]:.0f}" if k in t else "" for k in names)
        lines.append(f"| {name} | {shape[0]}x{shape[1]} | {n} | {t['compiled']:.0f} | {cells} | {t['compiled'] / best:.2f}x "
                     f"| {same:.1e} |")
    write_atomic(Path(args.out) / "compile_dequant.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
