"""The native decode step as a step implementation of the engine (``native/step.c``: every op of a
Llama-family decode step in one C call), behind the decoding core like the compiled loop.

Where it applies: an engine whose decode step the compiled loop could run (plain Llama-family
layers, no mechanism that changes the layer loop, one precision for every token: see
``compiled.structure``), whose weights the native kernels read (the stock float32/bfloat16
weights, AMQ's int8 per output channel without activation quantization, or the Q4_1 grid of ``fast4``), its final norm an
RMSNorm, and a pooled decode step (every row a row of one ``CachePool``). The weights are the
engine's own: views of the stock tensors, or the int8 codes the engine already quantized.
Whether it pays is measured per machine, shape and dtype like every kernel (``pays``); any
failure makes the caller run the eager step. Arithmetic is float32 inside (bfloat16 activations
keep their cache and rows in bfloat16), so its tokens can part from the eager step's at a
numerical near-tie; tests hold it to the eager step in float32.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from . import compiled, pooled
from .flops import head_flops

log = logging.getLogger(__name__)

_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> NativeStep, or the reason it has none


def _weights(engine):
    """One ``LayerWeights`` per layer and the head's weight, as the engine runs them (``Unavailable`` if none)."""
    from .native.step import LayerWeights, LinearWeight, Unavailable

    A, amq = engine.adapter, engine.config.amq
    q4 = amq.enabled and amq.scheme == "q4_1"
    if amq.enabled and not q4 and not (engine.uniform_bits == 8 and amq.group_size is None and amq.smoothing is None
                                       and not amq.activation_quant):
        raise Unavailable("the native step reads stock weights, int8 per output channel or the Q4_1 grid only")
    if q4 and amq.group_size != 32:
        raise Unavailable("the native 4-bit kernel reads Q4_1 groups of 32")
    layers = []
    for l, p in enumerate(A.layers):
        lin = engine.linears[l]
        if not amq.enabled:
            if p.qkv is None or p.gate_up is None:
                raise Unavailable("q/k/v or gate/up could not share one buffer")
            w = [LinearWeight.dense(p.qkv.weight, p.qkv.bias), LinearWeight.dense(p.o.weight, p.o.bias),
                 LinearWeight.dense(p.gate_up.weight, p.gate_up.bias), LinearWeight.dense(p.mlp_linears[2].weight, p.mlp_linears[2].bias)]
        else:
            if "gate_up" not in lin.fused:
                raise Unavailable("no fused gate/up")
            qs = [lin.fused["qkv"], lin.quant["o"], lin.fused["gate_up"], lin.quant["down"]]
            w = [LinearWeight.q4(q.q4, q.bias) if q4 else LinearWeight.int8(q.qw.codes, q.qw.scales, q.bias) for q in qs]
        layers.append(LayerWeights(*w, *p.rms_weights))
    if engine.head_q is not None:
        head_q, bits = engine.head_q
        if bits != 8 or head_q.qw.group_size is not None:
            raise Unavailable("the LM head is quantized in a format the native step does not read")
        head = LinearWeight.int8(head_q.qw.codes, head_q.qw.scales, head_q.bias)
    else:
        h = A.head_linear()
        head = LinearWeight.dense(h.weight, h.bias)
    return layers, head


def native_step(engine):
    """The engine's ``NativeStep``, built once; None where it does not apply (``why_not`` says why)."""
    got = _STEPS.get(engine)
    if got is None:
        got = _STEPS[engine] = _build(engine)
    return None if isinstance(got, str) else got


def why_not(engine) -> str:
    native_step(engine)
    got = _STEPS.get(engine)
    return got if isinstance(got, str) else ""


def _build(engine):
    if os.environ.get("QUICKSILVER_NATIVE_STEP", "1") == "0":
        return "QUICKSILVER_NATIVE_STEP=0"
    if compiled.structure(engine) is None:
        return "the layer loop is not a plain Llama-family decode step"
    A = engine.adapter
    if A.final_rms_weight is None:
        return "the final norm is not the layers' RMSNorm"
    try:
        from .native.step import NativeStep, StepShape, Unavailable

        layers, head = _weights(engine)
        p = A.layers[0]
        dtype = next(engine.model.parameters()).dtype
        return NativeStep(StepShape.of(engine.spec, p.rms_eps, p.attn_scale), layers, dtype, final_norm=A.final_rms_weight,
                          head=head)
    except (Unavailable, ImportError, OSError) as e:
        return str(e)


def applies(engine, segments, caches) -> bool:
    """A pooled decode step of an engine the native step serves."""
    return pooled.shared_pool(segments, caches) and native_step(engine) is not None


def _binding(step, pool):
    """The step's binding of the pool's buffers, kept beside the pool (it lives as long as they do)."""
    got = pool.bindings.get(id(step))
    if got is None or got[0] is not step:
        got = pool.bindings[id(step)] = (step, step.bind(pool.k, pool.v, pool.pos))
    return got[1]


def step(engine, ids, pos, caches):
    """A pooled decode step through the native step: (logits (B, V) float32, ledger), or None when it
    cannot run this step (a full cache row; the caches are then untouched and the eager step runs)."""
    s = native_step(engine)
    pool = caches[0].pool
    A = engine.adapter
    ledger = engine.step_ledger(caches, pos)
    h = A.embed(ids, pos).contiguous()
    cos, sin = A.rotary(pos)
    try:
        logits = s(h, cos, sin, pos, [c.slot for c in caches], [c.count(0) for c in caches], _binding(s, pool))
    except ValueError as e:  # checked before anything is written
        log.debug("native step declined: %s", e)
        return None
    L = engine.spec.n_layers
    for c, p in zip(caches, pos.tolist()):
        for layer in range(L):
            c.written(layer, 1)
        c.length = p + 1
        c.note_peak()
    ledger.flops["head"] += head_flops(engine.spec, ids.numel())
    return logits.to(ids.device), ledger


def pays(engine, rows: int) -> bool:
    """Whether the native step measured faster than the eager one here, for this shape and dtype, at
    ``rows`` rows (bucketed 1 / 8, cached in the kernel table); tests (unmeasured kernels) always take it."""
    from .kernels import kernel_table

    if os.environ.get("QUICKSILVER_KERNELS") == "unmeasured":
        return True
    dtype = next(engine.model.parameters()).dtype
    b = 1 if rows < 3 else 8
    amq = engine.config.amq
    amq = "stock" if not amq.enabled else "q4_1" if amq.scheme == "q4_1" else "int8"
    key = f"native-step/{'x'.join(map(str, compiled.structure(engine)))}/{str(dtype).removeprefix('torch.')}/{amq}"
    return kernel_table().fastest(key, str(b), ["eager", "native"], lambda: measure(engine, b)) == "native"


def measure(engine, rows: int, keys: int = 128) -> dict[str, float]:
    """Microseconds of one pooled decode step, eager and native, over a scratch cache of ``keys`` entries per row."""
    from .cache import CachePool
    from .kernels import time_call

    param = next(engine.model.parameters())
    spec = engine.spec
    caches = CachePool(spec.n_layers, rows, keys + 1, spec.n_kv_heads, spec.head_dim, param.dtype, param.device).rows
    ids = torch.zeros(rows, dtype=torch.long, device=param.device)
    pos = torch.full((rows,), keys, dtype=torch.long, device=param.device)
    segments = [(i, i + 1) for i in range(rows)]
    full = (keys, [keys] * spec.n_layers, 0)

    def once(native: bool):
        for c in caches:  # the same step again: entries past ``keys`` are overwritten
            c.restore(full)
        if not native or step(engine, ids, pos, caches) is None:
            engine.run(ids, pos, segments, caches)

    return {"eager": time_call(lambda: once(False), reps=9, budget_s=1.0) * 1e6,
            "native": time_call(lambda: once(True), reps=9, budget_s=1.0) * 1e6}
