"""Does ``torch.compile`` pay for the engine's per-layer decode work on this machine?

Issue #10 asks for ``torch.compile`` of the per-layer step where it measurably pays. The
matmuls and attention of a decode step already run in the native kernels (ctypes calls, which
a compiled graph cannot contain), so what a compiler could fuse is the rest of a layer: two
RMSNorms, RoPE on q and k, SiLU(gate) * up and two residual adds. This probe times exactly
that work for one layer of the default model's shape, eager against ``torch.compile``
(inductor, static shapes), at the decode row counts 1 and 8, in bfloat16, and writes
``compile_probe.md``. The engine compiles nothing unless a row here shows a gain.

    python benchmarks/compile_probe.py [--out docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, markdown_table, run_meta, write_results  # noqa: E402
from quicksilver.kernels import time_call  # noqa: E402


def layer_rest(h, attn_out, mlp_in_gate_up, q, k, cos, sin, w1, w2, eps: float = 1e-5):
    """One Llama layer's non-matmul decode work (the parts a compiler could fuse)."""
    def rms(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    n1 = rms(h, w1)
    q = q * cos + rot(q) * sin
    k = k * cos + rot(k) * sin
    h = h + attn_out
    n2 = rms(h, w2)
    gate, up = mlp_in_gate_up.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    return n1, n2, q, k, act, h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    d, H, Hkv, hd, ff, dt = 576, 9, 3, 64, 1536, torch.bfloat16
    compiled = torch.compile(layer_rest, dynamic=False)
    rows_out = []
    for n in (1, 8):
        torch.manual_seed(n)  # the same inputs every run: a verdict that moves is the code's, not the draw's
        inputs = (torch.randn(n, d, dtype=dt), torch.randn(n, d, dtype=dt), torch.randn(n, 2 * ff, dtype=dt),
                  torch.randn(n, H, hd, dtype=dt), torch.randn(n, Hkv, hd, dtype=dt),
                  torch.randn(n, 1, hd, dtype=dt), torch.randn(n, 1, hd, dtype=dt),
                  torch.randn(d, dtype=dt), torch.randn(d, dtype=dt))
        t0 = time.perf_counter()
        compiled(*inputs)
        compile_s = time.perf_counter() - t0
        eager_us = time_call(lambda: layer_rest(*inputs), reps=200, budget_s=1.0) * 1e6
        comp_us = time_call(lambda: compiled(*inputs), reps=200, budget_s=1.0) * 1e6
        # bfloat16 rounds each eager op, while the compiled graph keeps float32 between ops and rounds once, so
        # the two part by a few bfloat16 ulps; judged as fidelity is: each one's largest error against the same
        # work in float32 (a fixed tolerance between the two failed for 7 of 20 random draws at 8 rows)
        ref = layer_rest(*[x.float() for x in inputs])
        err = lambda outs: max((a.float() - r).abs().max().item() for a, r in zip(outs, ref))  # noqa: E731
        e_err, c_err = err(layer_rest(*inputs)), err(compiled(*inputs))
        rows_out.append((n, eager_us, comp_us, compile_s, e_err, c_err))
    head = header(run_meta(), "one layer of smollm2-135m's non-matmul decode work (2 RMSNorms, RoPE on q and k, SiLU * up, "
                              "2 residual adds), bfloat16, medians; inputs seeded (torch.manual_seed(rows)); errors: the largest absolute "
                              "difference of any output from the same work in float32.")
    table = markdown_table(["rows", "eager us per layer", "torch.compile us per layer", "speedup", "x 30 layers saves ms per step",
                            "first compile s", "largest error vs float32: eager", "compiled", "compiled as close"],
                           [(n, f"{e:.0f}", f"{c:.0f}", f"{e / c:.2f}x", f"{(e - c) * 30 / 1e3:.2f}", f"{cs:.1f}", f"{ee:.4f}",
                             f"{ce:.4f}", "yes" if ce <= ee else "NO") for n, e, c, cs, ee, ce in rows_out])
    text = head + "\n\n" + table
    write_results(Path(args.out), "compile_probe", {"header": head, "rows": rows_out}, text)
    print(text)


if __name__ == "__main__":
    main()
