"""Kernel table: every weight-only kernel on the default model's linear shapes, against bandwidth.

For each decoder linear shape of the default model (and the LM head), each precision (8, 4)
and each kernel that applies, microseconds at 1 / 8 / 64 / 512 rows and the GB/s of weight
bytes that implies; the plain bfloat16 ``F.linear`` over the model's own weights is the
reference. Then the real decode working set: one decode step's linears, all layers in
sequence at one row (weights stream from memory, not from cache), per kernel, against the
machine's copy bandwidth measured in the same run. Finally the dispatch table this machine
chose (``quicksilver.kernels``), remeasured here and saved as the cached choice.

    python benchmarks/bench_kernels.py [--out docs/results] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import copy_bandwidth, header, run_meta, write_results  # noqa: E402
from quicksilver import attn_kernels as AK  # noqa: E402
from quicksilver import kernels as K  # noqa: E402
from quicksilver import native  # noqa: E402
from quicksilver.adapters import adapter_for  # noqa: E402
from quicksilver.models import load_model  # noqa: E402
from quicksilver.quant import quantize_int8  # noqa: E402


def nested(weight: torch.Tensor, group: int | None) -> K.NestedWeight:
    qw = quantize_int8(weight, group)
    return K.NestedWeight(qw.codes, qw.scales, group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, _ = load_model("smollm2-135m", dtype=dtype)
    A = adapter_for(model)
    lins = A.layers[0].linears()
    shapes = {"q, o": lins["q"].weight, "k, v": lins["k"].weight, "gate, up": lins["gate"].weight,
              "down": lins["down"].weight, "qkv fused": torch.cat([lins[n].weight for n in "qkv"]),
              "gate+up fused": torch.cat([lins["gate"].weight, lins["up"].weight]), "LM head": A.head_linear().weight}
    bw = copy_bandwidth()
    rows_out, dense = [], {}
    for label, w in shapes.items():
        for bits in (8, 4):
            group = None  # per output channel: every kernel applies (group-32 int4 runs int4pack or dequant)
            nw = nested(w.float(), group)
            # the kernel dispatch's own measurement: decode-sized calls with weights out of cache
            timings = K.measure_shape(nw, bits, dtype)
            dense = K.measure_dense(w.contiguous(), dtype) if bits == 8 else dense
            for n in K.ROW_BUCKETS:
                for name, us in timings[n].items():
                    gbs = K.bytes_read(name, w.numel(), dtype) / us / 1e3
                    rows_out.append({"shape": label, "out": w.shape[0], "in": w.shape[1], "bits": bits, "group": group,
                                     "rows": n, "kernel": name, "us": us, "weight_GBps": gbs,
                                     "bf16_linear_us": dense[n]["torch"], "bf16_native_us": dense[n].get("native16")})
    # The decode working set: every decoder linear of every layer (and the head), one row, in sequence.
    sequence = {}
    x1 = {d: torch.randn(1, d, dtype=dtype) for d in (576, 1536)}
    all_w = [m.weight for p in A.layers for m in p.linears().values()] + [A.head_linear().weight]
    total_bf16 = sum(w.numel() * w.element_size() for w in all_w)
    t = K.time_call(lambda: [F.linear(x1[w.shape[1]], w) for w in all_w], reps=5, budget_s=3)
    sequence["bf16 F.linear (stock weights)"] = (t, total_bf16)
    fused = [m.weight for p in A.layers for m in (p.qkv, p.o, p.gate_up, p.mlp_linears[-1])] + [A.head_linear().weight]
    t = K.time_call(lambda: [F.linear(x1[w.shape[1]], w) for w in fused], reps=5, budget_s=3)
    sequence["bf16 F.linear, q/k/v and gate/up fused"] = (t, total_bf16)
    if "native16" in K.dense_candidates(fused[0], dtype):
        t = K.time_call(lambda: [K.DENSE_KERNELS["native16"](x1[w.shape[1]], w) for w in fused], reps=5, budget_s=3)
        sequence["bf16 native, q/k/v and gate/up fused (the engine's `off`)"] = (t, total_bf16)
    for bits, group in ((8, None), (8, 32), (4, None), (4, 32)):
        nws = [nested(w.float(), group) for w in all_w]
        for name in K.candidates(nws[0], bits, dtype):
            if name == "dequant":
                continue  # dequantizing the whole model every step is not a decode kernel
            t = K.time_call(lambda: [K.matmul(nw, x1[nw.shape[1]], bits, kernel=name) for nw in nws], reps=5, budget_s=3)
            nbytes = sum(K.bytes_read(name, nw.codes.numel(), dtype) for nw in nws)
            sequence[f"int{bits} {name} (group {group})"] = (t, nbytes)
    head = header(run_meta(), f"{native.describe()}; activations {args.dtype}; medians of repeated runs, one kernel after another.")
    lines = [head, "", f"Copy bandwidth (read + write): **{bw:.1f} GB/s**.", "",
             "**Decode working set**: all 210 decoder linears + LM head at one row, in sequence (one decode step's matmuls):", "",
             "| kernel | ms per step | weight MB read | GB/s | share of copy bandwidth |", "|---|---|---|---|---|"]
    for name, (t, nbytes) in sequence.items():
        lines.append(f"| {name} | {t * 1e3:.2f} | {nbytes / 1e6:.0f} | {nbytes / t / 1e9:.1f} | {nbytes / t / 1e9 / bw:.0%} |")
    kernel_names = list(dict.fromkeys(r["kernel"] for r in rows_out))
    lines += ["", f"**Per shape** (microseconds; GB/s of weight bytes read; calls of <= {K.COLD_ROWS} rows cycle "
              "through copies of the weight larger than the last-level cache, as a decode step reads it; "
              "bf16 = the stock weights through `F.linear` and through the native kernel):", "",
              "| shape | bits | rows | bf16 us | bf16 native us | " + " | ".join(f"{k} us (GB/s)" for k in kernel_names)
              + " | fastest low-bit |", "|---|---|---|---|---|" + "---|" * (len(kernel_names) + 1)]
    by = {}
    for r in rows_out:
        by.setdefault((r["shape"], r["bits"], r["rows"]), {})[r["kernel"]] = r
    for (label, bits, n), ks in by.items():
        first = next(iter(ks.values()))
        nat = "" if first["bf16_native_us"] is None else f"{first['bf16_native_us']:.0f}"
        cells = [f"{ks[k]['us']:.0f} ({ks[k]['weight_GBps']:.1f})" if k in ks else "" for k in kernel_names]
        fastest = min(ks, key=lambda k: ks[k]["us"])
        lines.append(f"| {label} | {bits} | {n} | {first['bf16_linear_us']:.0f} | {nat} | " + " | ".join(cells) + f" | {fastest} |")
    spec = A.arch
    attention = {f"{n}x{t}": AK.measure_attention(spec.n_heads, spec.n_kv_heads, spec.head_dim, n, t, dtype)
                 for n in (1, 8) for t in AK.ATTN_KEYS}
    att_names = list(next(iter(attention.values())))
    lines += ["", "**Decode attention** (one query row per sequence over head-major cached keys; microseconds per layer; "
              "`sdpa` = torch's fused kernel, `matmul` = two matmuls and a float32 softmax, as transformers' eager attention, "
              "`native` = the same in C with float32 scores):", "",
              "| rows | cached keys | " + " | ".join(f"{k} us" for k in att_names) + " | fastest |",
              "|---|---|" + "---|" * (len(att_names) + 1)]
    for key, us in attention.items():
        n, t = key.split("x")
        lines.append(f"| {n} | {t} | " + " | ".join(f"{us[k]:.0f}" for k in att_names) + f" | {min(us, key=us.get)} |")
    causal = {}
    if native.causal_applies(torch.zeros(1, spec.n_heads, spec.head_dim, dtype=dtype),
                             torch.zeros(1, spec.n_kv_heads, spec.head_dim, dtype=dtype)):
        causal = {t: AK.measure_causal(spec.n_heads, spec.n_kv_heads, spec.head_dim, t, dtype) for t in AK.CAUSAL_T}
        lines += ["", "**Prefill attention** (causal self-attention of one sequence, all heads of one layer; "
                  "milliseconds; `sdpa` = torch's fused kernel, `native` = the flash kernel in C):", "",
                  "| tokens | sdpa ms | native ms | native speedup |", "|---|---|---|---|"]
        for t, us in causal.items():
            lines.append(f"| {t:,} | {us['sdpa'] / 1e3:.2f} | {us['native'] / 1e3:.2f} | {us['sdpa'] / us['native']:.2f}x |")
    write_results(Path(args.out), "kernels", {"header": head, "copy_GBps": bw, "rows": rows_out,
                                               "sequence": {k: {"seconds": t, "bytes": b} for k, (t, b) in sequence.items()},
                                               "decode_attention_us": attention, "causal_attention_us": causal}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
