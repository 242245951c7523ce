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

import torch
import torch.nn.functional as F

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
        return _state.engine._step_linear(fn, x)

    def attend(q, k, v, pos, layer):
        return _state.engine._step_attend(layer, q, k, v, pos, _state.caches, _state.plans)

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


def wanted(engine, rows: int, steps: int) -> bool:
    """Should a generation of ``rows`` sequences and ``steps`` decode steps compile its steps?"""
    if getattr(engine, "_step_key", None) is None or _failed is not None:  # also an engine-like wrapper
        return False
    m = mode()
    if m != "auto":
        return m == "on"
    global _eager_steps
    if engine._step_key in _steps:  # compiled in this process already: free from now on
        return engine._compile_pays(rows)
    _eager_steps += steps
    if steps < MIN_STEPS and _eager_steps < MIN_STEPS:
        return False
    return engine._compile_pays(rows)


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
