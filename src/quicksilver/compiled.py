"""``torch.compile`` of the engine's decode step, with an eager fallback.

A decode step of the default model spends about as much time between its matmuls as in them
(2-core EPYC, bfloat16, batch 1: 6.5 ms of native matmuls and attention in a 14 ms step):
some 60 small torch ops per layer, each a few microseconds of dispatch. ``torch.compile``
(inductor) fuses that pointwise work (RMSNorm, RoPE, SiLU * up, residual adds) into a few
generated C++ loops and replaces op-by-op dispatch with one generated function per step.

The matmuls, the attention and the cache writes stay the engine's own (measured kernels,
ctypes calls and in-place cache bookkeeping, which a graph cannot contain). They enter the
graph as two opaque custom ops, ``quicksilver::call`` (a linear of layer l) and
``quicksilver::attend`` (write the step's K/V into the pooled cache, attend), which call back
into the engine that is running the step (a thread-local). A compiled call costs about 30
microseconds of guard checks on that CPU, so the whole step, every layer, is one graph; a
graph per layer would spend most of what it saves.

Where it applies: Llama-family layers (RMSNorm, RoPE, SiLU-gated MLP; ``LayerParams.rms_eps``
set by the adapter) in a decode step of a pooled batch, with every mechanism that changes the
layer loop off (halting, KV skipping, fusion, per-row precisions). Weight quantization at one
precision is fine: it lives inside ``quicksilver::call``.

Whether it pays is measured per machine, model shape, dtype and row count, like the kernels
(``Engine`` asks ``KernelTable.fastest`` with ``eager`` and ``compiled`` as candidates), and
compiling costs seconds, so it starts only once a process has decoded ``MIN_STEPS`` steps (or a
generation asks for that many); from then on every generation of the process uses it. Any failure of the compiler (no C++ compiler on the machine, an unsupported
op) switches compiling off for the process and the step runs eagerly; ``QUICKSILVER_COMPILE=0``
switches it off, ``=1`` forces it where it applies (tests).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

import torch
import torch.nn.functional as F

from . import pooled
from .adapters.base import signed_sin

log = logging.getLogger(__name__)

# Compiling costs seconds per process (20 s cold on a 2-core EPYC, 4 s with inductor's on-disk
# cache warm) and saves a few ms per step, so it starts once a process has decoded this many
# steps eagerly (a server, a benchmark), or for a generation that asks for this many.
MIN_STEPS = 512
_eager_steps = 0  # decode steps this process ran eagerly where the compiled step would have applied

_state = threading.local()  # .engine, .caches, .plans of the step being run
_failed: str | None = None  # why compiling was switched off in this process
_steps: dict = {}  # structure key -> compiled step function
BACKEND = "inductor"  # torch.compile's backend (tests swap in one that fails)


def _define_ops() -> None:
    lib = torch.library.Library("quicksilver", "DEF")
    lib.define("call(Tensor x, int fn, int out) -> Tensor")
    lib.define("attend(Tensor q, Tensor k, Tensor v, Tensor pos, int layer) -> Tensor")

    def call(x, fn, out):
        return _linear(_state.engine, fn)(x)

    def attend(q, k, v, pos, layer):
        engine = _state.engine
        return pooled.decode(layer, q, k, v, pos, _state.caches, engine.adapter.layers[layer].attn_scale, _state.plans)[0]

    for key in ("CPU", "CUDA"):
        lib.impl("call", call, key)
        lib.impl("attend", attend, key)
    torch.library.register_fake("quicksilver::call", lambda x, fn, out: x.new_empty(x.shape[0], out), lib=lib)
    torch.library.register_fake("quicksilver::attend",
                                lambda q, k, v, pos, layer: q.new_empty(q.shape[0], q.shape[1] * q.shape[2]), lib=lib)
    _state_lib.append(lib)  # a Library unregisters its ops when collected


_state_lib: list = []
_define_ops()


def mode() -> str:
    """``off``, ``on`` (forced where it applies) or ``auto`` (measured), from ``QUICKSILVER_COMPILE``."""
    v = os.environ.get("QUICKSILVER_COMPILE", "auto").strip().lower()
    return {"0": "off", "off": "off", "1": "on", "on": "on"}.get(v, "auto")


def failed() -> str | None:
    """Why compiling was switched off in this process (None: it was not)."""
    return _failed


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it: float32 statistics, weight in the model dtype."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def llama_step(L: int, H: int, Hkv: int, hd: int, d: int, d_ff: int, eps: float):
    """The layer loop of a Llama decode step as one function of tensors (what is compiled).

    ``step(h (N, d), cos (N, hd), sin (N, hd) with rotate_half's sign folded in, pos (N,),
    norms: 2L weights (attention norm, MLP norm per layer)) -> h after the last layer``.
    Linear ``4l + j`` (j: qkv, o, gate_up, down) and the attention of layer l call back into
    the engine. The same arithmetic as the engine's eager layer (``Engine._layer_compact``).
    """
    qd, kd = H * hd, Hkv * hd

    def step(h, cos, sin, pos, norms: list[torch.Tensor]):
        c, s = cos[:, None, :], sin[:, None, :]
        for l in range(L):
            qkv = torch.ops.quicksilver.call(rms(h, norms[2 * l], eps), 4 * l, qd + 2 * kd)
            q, k, v = qkv.split([qd, kd, kd], dim=-1)
            q, k, v = q.reshape(-1, H, hd), k.reshape(-1, Hkv, hd), v.reshape(-1, Hkv, hd)
            q = q * c + q.roll(hd // 2, dims=-1) * s
            k = k * c + k.roll(hd // 2, dims=-1) * s
            a = torch.ops.quicksilver.attend(q, k, v, pos, l)
            h = h + torch.ops.quicksilver.call(a, 4 * l + 1, d)
            gu = torch.ops.quicksilver.call(rms(h, norms[2 * l + 1], eps), 4 * l + 2, 2 * d_ff)
            gate, up = gu.chunk(2, dim=-1)
            h = h + torch.ops.quicksilver.call(F.silu(gate) * up, 4 * l + 3, d)
        return h

    return step


def compiled_step(key: tuple, make):
    """The compiled function for a step structure ``key`` (made by ``make()`` on first use).

    Shapes are dynamo's default: the first row count is compiled as it is, a second one makes
    the row dimension symbolic (so a batch whose rows finish one by one compiles twice, not once
    per row count).
    """
    f = _steps.get(key)
    if f is None:
        f = _steps[key] = torch.compile(make(), backend=BACKEND, fullgraph=True)
    return f


_STRUCTURE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> its step structure (or None)
_LINEARS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> {linear index: callable}


def structure(engine) -> tuple | None:
    """The shape of an engine's compiled decode step (``llama_step``'s arguments), or None where the
    step cannot be compiled: a mechanism that changes the layer loop, per-row precisions, layers
    spread over devices, or layers other than plain Llama ones. Worked out once per engine."""
    if engine in _STRUCTURE:
        return _STRUCTURE[engine]
    if getattr(engine, "linears", None) is None:  # a runner other than the Engine: nothing to compile
        return None
    cfg, spec, layers = engine.config, engine.spec, engine.adapter.layers
    key = None
    if not (cfg.halting.enabled or cfg.kv.enabled or cfg.fusion.enabled) and engine.uniform_bits is not None:
        plain = all(p.rms_eps is not None and p.rms_eps == layers[0].rms_eps and p.q_norm is None and p.k_norm is None
                    and p.attn_out_norm is None and p.mlp_out_norm is None and p.window is None and p.rope_key is None
                    and p.device == layers[0].device for p in layers)
        if plain and spec.gated_mlp:
            key = (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model, spec.d_ff, layers[0].rms_eps)
    _STRUCTURE[engine] = key
    return key


def applies(engine, segments, caches, logit_rows=None) -> bool:
    """A pooled decode step (one row per cache, caches rows of one pool) of an engine whose step compiles."""
    return logit_rows is None and structure(engine) is not None and pooled.shared_pool(segments, caches)


def _linear(engine, fn: int):
    """Linear ``fn = 4 l + j`` of the step (j: qkv, o, gate_up, down), as the eager layer runs it; resolved once."""
    table = _LINEARS.setdefault(engine, {})
    f = table.get(fn)
    if f is None:
        l, j = divmod(fn, 4)
        f = table[fn] = engine.linears[l].step_fn(j, engine.bits_of(None, None))
    return f


def step(engine, ids, pos, caches):
    """A pooled decode step through the compiled layer loop: (logits (B, V), ledger), or None if the
    compiler failed (the caches are then as before the call, and the caller runs the step eagerly)."""
    key = structure(engine)
    A = engine.adapter
    ledger = engine.step_ledger(caches, pos)
    saved = [c.snapshot() for c in caches]
    h = A.embed(ids, pos)
    cos, sin = A.rotary(pos)
    norms = [w for p in A.layers for w in p.rms_weights]
    fn = compiled_step(key, lambda: llama_step(*key))
    h = run(engine, fn, (h, cos, signed_sin(sin), pos, norms), caches, {})
    if h is None:  # nothing was kept of a failed call: the eager loop runs the step again
        for c, snap in zip(caches, saved):
            c.restore(snap)
        return None
    for c, p in zip(caches, pos.tolist()):
        c.length = p + 1
        c.note_peak()
    return engine.logits(h, ids, None, ledger)


def pays(engine, rows: int) -> bool:
    """Whether the compiled decode step measured faster than the eager one on this machine, for
    this model's shape and dtype, at ``rows`` rows (bucketed 1 / 8 as the kernels; cached)."""
    from .kernels import kernel_table

    dtype = next(engine.model.parameters()).dtype
    b = 1 if rows < 3 else 8
    key = f"decode-step/{'x'.join(map(str, structure(engine)))}/{str(dtype).removeprefix('torch.')}"
    return kernel_table().fastest(key, str(b), ["eager", "compiled"], lambda: measure(engine, b)) == "compiled"


def measure(engine, rows: int, keys: int = 128) -> dict[str, float]:
    """Microseconds of one pooled decode step, eager and compiled (compiling first), over a
    scratch cache of ``keys`` entries per row; a compiler failure measures as infinitely slow."""
    from .cache import CachePool
    from .kernels import time_call

    param = next(engine.model.parameters())
    spec = engine.spec
    caches = CachePool(spec.n_layers, rows, keys + 1, spec.n_kv_heads, spec.head_dim, param.dtype, param.device).rows
    ids = torch.zeros(rows, dtype=torch.long, device=param.device)
    pos = torch.full((rows,), keys, dtype=torch.long, device=param.device)
    segments = [(i, i + 1) for i in range(rows)]
    full = (keys, [keys] * spec.n_layers, 0)

    def once(compiled: bool):
        for c in caches:  # the same step again: entries past ``keys`` are overwritten
            c.restore(full)
        if not compiled or step(engine, ids, pos, caches) is None:
            engine.run(ids, pos, segments, caches)

    eager = time_call(lambda: once(False), reps=15, budget_s=1.0) * 1e6
    once(True)  # compiles
    if failed() is not None:
        return {"eager": eager, "compiled": float("inf")}
    return {"eager": eager, "compiled": time_call(lambda: once(True), reps=15, budget_s=1.0) * 1e6}


def wanted(engine, rows: int, steps: int) -> bool:
    """Should a generation of ``rows`` sequences and ``steps`` decode steps compile its steps?"""
    m = mode()
    if m == "off" or _failed is not None or structure(engine) is None:
        return False
    if m != "auto":
        return m == "on"
    global _eager_steps
    if structure(engine) in _steps:  # compiled in this process already: free from now on
        return pays(engine, rows)
    _eager_steps += steps
    if steps < MIN_STEPS and _eager_steps < MIN_STEPS:
        return False
    return pays(engine, rows)


def run(engine, fn, args, caches, plans):
    """``fn(*args)`` with the engine's ops bound to this step; None if the compiler failed
    (then compiling stays off for the process and the caller runs the step eagerly)."""
    global _failed
    _state.engine, _state.caches, _state.plans = engine, caches, plans
    try:
        return fn(*args)
    except Exception as e:  # the compiler's failure modes are many (no C++ compiler, unsupported op, ...)
        _failed = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        log.warning("torch.compile failed, decoding eagerly from now on: %s", _failed)
        return None
    finally:
        _state.engine = _state.caches = _state.plans = None
