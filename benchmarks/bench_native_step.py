"""The native decode step (``quicksilver.native.step``) against the engine's eager step, same run.

For the default model's shapes and weights, per weight format and batch size, one pooled decode
step over ``--keys`` cached entries per row (the step is repeated at the same position, as the
engine's own step measurement does):

- eager: ``Engine.run`` of one decode step (embedding, 30 layers, final norm, LM head), with the
  preset that holds those weights (``off``; ``fast`` for int8; ``int4`` (MatQuant slice, no fast
  kernel) beside the 4-bit format);
- native: what a decode core would run: the embedding and the model's rotary module in torch,
  then one C call for every layer, the final norm and the head (logits in float32);
- native C call alone, its matmuls alone (same threads and order), and the glue (step minus
  matmuls); per layer: the C call without the head over the layers;
- bytes a step reads (weights, and the K/V entries its attention reads), and the fraction of the
  machine's copy bandwidth (2 threads, read + write, measured in this run) the native C call reaches;
- a second table: where the native step's milliseconds go, per phase (a ``QS_TIMING`` build of
  the same step: thread 0's clock, the wait for the other threads included).

Weights: ``dense`` (the model's own, in the run's dtype), ``i8`` (per output channel, the head
too: the ``fast`` preset's), ``q4`` (group-32 asymmetric 4-bit, ``quicksilver.quant_q4``; the head
int8, since the tied embedding is not on a 4-bit grid). Eager and native alternate rep by rep.

    python benchmarks/bench_native_step.py [--dtypes float32,bfloat16] [--formats dense,i8,q4]
        [--batches 1,8] [--keys 128] [--reps 15] [--threads 2] [--out docs/results]
    python benchmarks/bench_native_step.py --render   # native_step.md again from native_step.json

Writes ``native_step.json`` and ``native_step.md`` (both tables, under the harness header: command,
machine, commit) into ``--out``, and prints the tables as it goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from quicksilver import load_model
from quicksilver.cache import CachePool
from quicksilver.config import Config
from quicksilver.evaluate import make_engine
from quicksilver.native import step as native_step
from quicksilver.native.step import PHASES, LayerWeights, LinearWeight, NativeStep, StepShape, phase_seconds
from quicksilver.quant import quantize_int8
from quicksilver.quant_q4 import quantize_q4

EAGER_PRESET = {"dense": "off", "i8": "fast", "q4": "int4"}


def linear_weight(w: torch.Tensor, fmt: str) -> LinearWeight:
    if fmt == "dense":
        return LinearWeight.dense(w)
    if fmt == "i8":
        q = quantize_int8(w.float())
        return LinearWeight.int8(q.codes, q.scales)
    return LinearWeight.q4(quantize_q4(w.float()))


def native_layers(adapter, fmt: str) -> list[LayerWeights]:
    """The adapter's Llama layers as the native step takes them (fused qkv and gate_up weights)."""
    out = []
    for p in adapter.layers:
        qkv = p.qkv.weight if p.qkv is not None else torch.cat([p.q.weight, p.k.weight, p.v.weight])
        gate, up, down = p.mlp_linears
        gu = p.gate_up.weight if p.gate_up is not None else torch.cat([gate.weight, up.weight])
        out.append(LayerWeights(linear_weight(qkv, fmt), linear_weight(p.o.weight, fmt), linear_weight(gu, fmt),
                                linear_weight(down.weight, fmt), p.rms_weights[0], p.rms_weights[1]))
    return out


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def measure(model, tok, dtype, fmt: str, batch: int, keys: int, reps: int, copy_gbs: float) -> dict:
    engine = make_engine(model, tok, Config.preset(EAGER_PRESET[fmt]))
    A, spec = engine.adapter, engine.spec
    shape = StepShape.of(spec, A.layers[0].rms_eps, A.layers[0].attn_scale)
    layers = native_layers(A, fmt)
    head = linear_weight(A._head.weight, "dense" if fmt == "dense" else "i8")
    step = NativeStep(shape, layers, dtype, final_norm=A._norm.weight, head=head)
    body = NativeStep(shape, layers, dtype)  # the layers alone (per-layer time)
    profiled = NativeStep(shape, layers, dtype, final_norm=A._norm.weight, head=head, defines=("QS_TIMING=1",))
    L = spec.n_layers
    pools = [CachePool(L, batch, keys + 1, spec.n_kv_heads, spec.head_dim, dtype) for _ in range(2)]
    for pool in pools:
        for t in pool.k + pool.v:
            t.normal_()
    eager_caches, native_caches = pools[0].rows, pools[1].rows
    binding = step.bind(pools[1].k, pools[1].v, pools[1].pos)
    ids = torch.randint(0, spec.vocab_size, (batch,))
    pos = torch.full((batch,), keys, dtype=torch.long)
    segments = [(i, i + 1) for i in range(batch)]

    def reset(caches):
        for c in caches:
            c._n, c.length = [keys] * L, keys

    def eager():
        reset(eager_caches)
        engine.run(ids, pos, segments, eager_caches)

    out = torch.empty(batch, spec.vocab_size)  # the logits buffer a decode loop keeps

    def native():  # what a decode core's native step implementation runs
        reset(native_caches)
        h = A.embed(ids, pos).contiguous()
        cos, sin = A.rotary(pos)
        logits = step(h, cos, sin, pos, [c.slot for c in native_caches], [c.count(0) for c in native_caches], binding,
                      out=out)
        for c in native_caches:
            c._n = [n + 1 for n in c._n]
            c.length = int(pos[0]) + 1
        return logits

    h0 = A.embed(ids, pos).contiguous()
    cos, sin = A.rotary(pos)
    slots, counts = list(range(batch)), [keys] * batch
    call = lambda s: s(h0.clone(), cos, sin, pos, slots, counts, binding, out=out if s.head is not None else None)  # noqa: E731
    timed = {"eager": eager, "native": native, "call": lambda: call(step), "layers": lambda: call(body),
             "matmuls": lambda: step.matmuls_only(batch)}
    times = {k: [] for k in timed}
    with torch.inference_mode():
        for f in timed.values():
            f()
            f()
        order = list(timed)
        for i in range(reps):
            for k in (order if i % 2 == 0 else order[::-1]):  # alternate which side runs first
                t0 = time.perf_counter()
                timed[k]()
                times[k].append(time.perf_counter() - t0)
        for _ in range(2):
            call(profiled)
        phase_seconds(profiled, reset=True)
        for _ in range(reps):
            call(profiled)
    phases = {k: 1e3 * v / reps for k, v in phase_seconds(profiled).items()}
    ms = {k: median_ms(v) for k, v in times.items()}
    kv_gb = 2 * L * batch * spec.n_kv_heads * (keys + 1) * spec.head_dim * torch.empty(0, dtype=dtype).element_size() / 1e9
    gb = step.weight_bytes / 1e9
    return {"dtype": str(dtype).removeprefix("torch."), "weights": fmt, "batch": batch,
            "eager_preset": EAGER_PRESET[fmt], "eager_ms": ms["eager"], "native_ms": ms["native"],
            "speedup": ms["eager"] / ms["native"], "call_ms": ms["call"], "matmuls_ms": ms["matmuls"],
            "glue_ms": ms["native"] - ms["matmuls"], "per_layer_us": 1e3 * ms["layers"] / L,
            "weight_mb": 1e3 * gb, "kv_mb": 1e3 * kv_gb, "bandwidth_fraction": (gb + kv_gb) / (ms["call"] / 1e3) / copy_gbs,
            "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--formats", default="dense,i8,q4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--keys", type=int, default=128, help="cached entries per row")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results", help="folder for native_step.json / .md")
    ap.add_argument("--render", action="store_true", help="write native_step.md from native_step.json; measure nothing")
    args = ap.parse_args()
    if args.render:
        path = Path(args.out) / "native_step.json"
        if not path.exists():
            sys.exit(f"error: {path} does not exist: run the benchmark first")
        data = json.loads(path.read_text())
        harness.write_results(Path(args.out), "native_step", data, render(data))
        return
    torch.set_num_threads(args.threads)
    if not native_step.available():
        sys.exit(f"error: {native_step.describe()}")
    meta = harness.run_meta(native=native_step.describe(), keys=args.keys, reps=args.reps)
    copy_gbs = harness.copy_bandwidth()  # in the weights' own kind of memory, as the peers table's
    what = (f"{native_step.describe()}; copy bandwidth ({args.threads} threads, read + write) {copy_gbs:.1f} GB/s; "
            f"one pooled decode step over {args.keys} cached entries per row, median of {args.reps} alternating reps")
    print(harness.header(meta, what), flush=True)
    rows = []
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        model, tok = load_model("smollm2-135m", dtype=dtype)
        for wfmt in args.formats.split(","):
            for b in (int(x) for x in args.batches.split(",")):
                row = measure(model, tok, dtype, wfmt, b, args.keys, args.reps, copy_gbs)
                rows.append(row)
                print("| " + " | ".join(fmt(row[c]) for c in COLS) + " |", flush=True)
    data = {"meta": {**meta, "copy_gbs": copy_gbs, "what": what}, "rows": rows}
    markdown = render(data)
    print("\n" + markdown.split("\n\n")[-1])
    harness.write_results(Path(args.out), "native_step", data, markdown)


COLS = ("dtype", "weights", "batch", "eager_preset", "eager_ms", "native_ms", "speedup", "call_ms", "matmuls_ms",
        "glue_ms", "per_layer_us", "weight_mb", "kv_mb", "bandwidth_fraction")


def fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def render(data: dict) -> str:
    """The markdown of a run: the harness header, the step table, the per-phase table."""
    meta, rows = data["meta"], data["rows"]
    what = meta.get("what") or (f"{meta.get('native', '')}; copy bandwidth ({meta['threads']} threads, read + write) {meta['copy_gbs']:.1f} GB/s; one pooled "
                                f"decode step over {meta['keys']} cached entries per row, median of {meta['reps']} alternating reps")
    steps = harness.markdown_table(COLS, [[fmt(r[c]) for c in COLS] for r in rows])
    phases = harness.markdown_table(("dtype", "weights", "batch", *PHASES),
                                    [[r["dtype"], r["weights"], r["batch"], *(f"{r['phases'][p]:.2f}" for p in PHASES)]
                                     for r in rows])
    return "\n".join([harness.header(meta, what), "", steps, "",
                      "`glue_ms` is `native_ms` less `matmuls_ms`, two medians timed apart: within about a millisecond it is "
                      "noise, and it can come out below zero.", "",
                      "Where a native step's milliseconds go (a `QS_TIMING` build of the same step: thread 0's clock, "
                      "the wait for the other threads included; mean ms per step):", "", phases])


if __name__ == "__main__":
    main()
