"""A whole Llama-family decode step in one C call (``step.c``), and its torch reference.

Between its matmuls a decode step of a small model runs some 60 tiny torch ops per layer
(norms, RoPE, cache writes, attention, SiLU, residual adds), each microseconds of dispatch:
milliseconds per step. Here every op of every layer runs in C within one OpenMP region per
step, over plain tensors the caller owns:

- weights: one ``LinearWeight`` per fused linear (qkv, o, gate_up, down), in float32,
  bfloat16, int8 with per-output-channel scales, or group-wise 4-bit (``quicksilver.quant_q4``);
- the pooled, head-major cache of ``quicksilver.cache.CachePool`` (per layer k/v (P, Hkv, cap,
  hd) in the activation dtype, positions (P, cap) int64), bound once per pool (``bind``);
- per call: the rows' hidden states (B, d), the rotary tables (B, hd) that the model's own
  rotary module computed, their positions, pool rows and cache counts.

Arithmetic is float32 throughout; with bfloat16 activations only the cache entries and the
rows in and out are bfloat16. ``reference_step`` computes the same step with torch ops; the
tests hold the two together. Nothing here decides *whether* to use the native step: the caller
builds a ``NativeStep`` (``Unavailable`` says why it cannot: no compiler, ``QUICKSILVER_NATIVE=0``,
a shape the kernels do not serve) and falls back to its eager step otherwise.

Usage (a decode step over rows of one pool)::

    step = NativeStep(shape, layers, torch.float32, final_norm=w_norm, head=LinearWeight.dense(w_head))
    cache = step.bind(pool.k, pool.v, pool.pos)           # once per CachePool
    logits = step(h, cos, sin, positions, slots, counts, cache, out=buf)  # h (B, d) is overwritten
    # then, as the eager step does: every row's count += 1 at every layer, length = position + 1

A step object is one model's weights; it is not thread-safe (it reuses one scratch buffer).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import arena
from . import FLAGS, load
from . import build_id as native_build_id

SOURCE = Path(__file__).with_name("step.c")
FORMATS = {"f32": 0, "bf16": 1, "i8": 2, "q4": 3}
ERRORS = {-1: "unsupported shape", -2: "unsupported weight", -3: "cache index out of range", -4: "out of memory"}
_P = ctypes.c_void_p


class Unavailable(RuntimeError):
    """The native step cannot run here (the message says why); the caller runs its eager step."""


class _Weight(ctypes.Structure):
    _fields_ = [("fmt", ctypes.c_int32), ("out", ctypes.c_int32), ("in_", ctypes.c_int32), ("group", ctypes.c_int32),
                ("w", _P), ("scale", _P), ("sm", _P), ("bias", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Weight), ("o", _Weight), ("gate_up", _Weight), ("down", _Weight),
                ("attn_norm", _P), ("mlp_norm", _P)]


class _Shape(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("d", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("n_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("d_ff", ctypes.c_int32),
                ("act_bf16", ctypes.c_int32), ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float)]


def _setup(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.qs_step.argtypes = [_P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_int, _P, _P, _P, _P,
                            _P, _P, _P, _P, ctypes.c_size_t]
    lib.qs_step_scratch_bytes.argtypes = [_P, ctypes.c_int, ctypes.c_int]
    lib.qs_step_scratch_bytes.restype = ctypes.c_size_t
    lib.qs_step.restype = ctypes.c_int
    lib.qs_step_check.argtypes = [_P, _P]
    lib.qs_step_check.restype = ctypes.c_int
    lib.qs_matmul.argtypes = [_P, _P, ctypes.c_int, _P]
    lib.qs_matmul.restype = ctypes.c_int
    lib.qs_step_matmuls.argtypes = [_P, _P, ctypes.c_int, _P]
    lib.qs_step_matmuls.restype = ctypes.c_int
    lib.qs_step_lanes.restype = ctypes.c_int
    lib.qs_step_isa.restype = ctypes.c_char_p
    lib.qs_step_bf16_dot.restype = ctypes.c_int
    return lib


def _flags(defines: tuple[str, ...]) -> tuple[str, ...]:
    flags = FLAGS + ("-ffp-contract=off",)
    if "QS_PORTABLE=1" in defines:  # the build of a CPU the compiler knows nothing of: baseline x86-64
        flags = tuple("-march=x86-64" if f == "-march=native" else f for f in flags)
    return flags + tuple(f"-D{d}" for d in defines)


@functools.lru_cache(maxsize=None)
def _library(defines: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str]:
    lib, why = load(SOURCE, _flags(defines))
    return (None if lib is None else _setup(lib)), why


def build_id() -> str:
    """What the step library is built from (source, compiler, flags, CPU), as a short hash: a changed
    step.c is measured again wherever a choice was measured against it (``kernels.machine_key``)."""
    return native_build_id(SOURCE, _flags(()))


def library(defines: tuple[str, ...] = ()):
    """The step library for this CPU (None when it cannot be built; ``why_not`` says why).
    ``defines`` (tests, benchmarks): extra ``NAME=VALUE`` macros: ``QS_VW=4`` or ``16`` (another
    vector width), ``QS_PORTABLE=1`` (built for baseline x86-64: no FMA, no F16C), ``QS_TIMING=1``
    (``phase_seconds``)."""
    return _library(tuple(defines))[0]


def why_not(defines: tuple[str, ...] = ()) -> str:
    """Why the native step is unavailable ("" when it is available)."""
    return _library(tuple(defines))[1]


def available() -> bool:
    return library() is not None


def describe() -> str:
    """One line for benchmark headers."""
    lib = library()
    if lib is None:
        return f"native step: unavailable ({why_not()})"
    dot = "; bfloat16 matmuls as AVX-512 BF16 dot products" if lib.qs_step_bf16_dot() else ""
    return f"native step: {lib.qs_step_isa().decode()}, {32 * lib.qs_step_lanes()}-bit vectors{dot}"


@dataclass(frozen=True)
class StepShape:
    """What the step needs of a Llama-family model's shape (``ArchSpec`` fields, the norm's epsilon
    and the attention scale, usually head_dim ** -0.5)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    eps: float
    attn_scale: float

    @classmethod
    def of(cls, spec, eps: float, attn_scale: float) -> StepShape:
        """From an ``ArchSpec`` (``quicksilver.adapters.base``)."""
        return cls(spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_ff, eps, attn_scale)

    @property
    def qkv_out(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim


BLOCK_ROWS = 4  # rows whose chunks interleave in the int8 and 4-bit layouts (step.c's OB)
CHUNK = 32  # weights per chunk (step.c's CH)


def _interleave(rows: torch.Tensor) -> torch.Tensor:
    """(out, n_chunks, chunk_bytes) -> the kernels' layout, flat: full blocks of 4 rows with their
    chunks interleaved (chunk c of the 4 rows, then chunk c + 1...), then the last out % 4 rows."""
    full = rows.shape[0] // BLOCK_ROWS * BLOCK_ROWS
    head = rows[:full].reshape(full // BLOCK_ROWS, BLOCK_ROWS, *rows.shape[1:]).transpose(1, 2)
    return torch.cat([head.reshape(-1), rows[full:].reshape(-1)]).contiguous()


def _deinterleave(flat: torch.Tensor, out_f: int, n_chunks: int, chunk_bytes: int) -> torch.Tensor:
    """``_interleave`` undone: (out, n_chunks, chunk_bytes)."""
    full = out_f // BLOCK_ROWS * BLOCK_ROWS
    n_head = full * n_chunks * chunk_bytes
    head = flat[:n_head].reshape(full // BLOCK_ROWS, n_chunks, BLOCK_ROWS, chunk_bytes).transpose(1, 2)
    return torch.cat([head.reshape(full, n_chunks, chunk_bytes), flat[n_head:].reshape(-1, n_chunks, chunk_bytes)])


@dataclass(frozen=True)
class LinearWeight:
    """One linear's weight as the native kernels read it (build with ``dense``, ``int8`` or ``q4``).

    ``data``: float32 or bfloat16 (out, in), the model's tensor (``f32``/``bf16``); or a flat copy in
    the kernels' layout (``i8``: int8 codes, times ``scale`` (out,) float32 per output channel;
    ``q4``: GGUF block_q4_1 chunks of 32 weights, float16 scale and minimum then 16 bytes of
    codes), rows interleaved 4 at a time (``_interleave``). ``bias`` (out,) float32 or None.
    """

    fmt: str
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearWeight:
        """A float32 or bfloat16 weight as it is (no copy when contiguous: a view of the model's)."""
        fmt = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(weight.dtype)
        if fmt is None:
            raise Unavailable(f"no native kernel for {weight.dtype} weights")
        return cls(fmt, tuple(weight.shape), weight.detach().contiguous(), bias=_bias(bias))

    @classmethod
    def int8(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> LinearWeight:
        """int8 codes (out, in) with one scale per output channel ((out,) or (out, 1)): w = codes * scale."""
        out_f, in_f = codes.shape
        if in_f % CHUNK:
            raise Unavailable(f"int8 weight {out_f}x{in_f}: inputs must be a multiple of {CHUNK}")
        data = _interleave(codes.to(torch.int8).reshape(out_f, in_f // CHUNK, CHUNK))
        return cls("i8", (out_f, in_f), data, scale=scale.detach().float().reshape(-1).contiguous(), bias=_bias(bias))

    @classmethod
    def q4(cls, qw, bias: torch.Tensor | None = None) -> LinearWeight:
        """A ``quant_q4.Q4Weight`` of group size 32 (Q4_1's block)."""
        out_f, in_f = qw.shape
        if qw.group_size != CHUNK:
            raise Unavailable(f"the native 4-bit kernel reads groups of {CHUNK}, not {qw.group_size}")
        sm = torch.stack([qw.scales, qw.mins], dim=-1).to(torch.float16).contiguous().view(torch.uint8)  # (out, n, 4)
        rows = torch.cat([sm, qw.codes.reshape(out_f, in_f // CHUNK, CHUNK // 2)], dim=-1)  # (out, n, 20)
        return cls("q4", (out_f, in_f), _interleave(rows), bias=_bias(bias))

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def group_size(self) -> int:
        return CHUNK if self.fmt == "q4" else 0

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the weight reads."""
        return sum(t.nbytes for t in (self.data, self.scale, self.bias) if t is not None)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) this format means."""
        out_f, in_f = self.shape
        if self.fmt in ("f32", "bf16"):
            return self.data.float()
        if self.fmt == "i8":
            codes = _deinterleave(self.data, out_f, in_f // CHUNK, CHUNK).reshape(out_f, in_f)
            return codes.float() * self.scale[:, None]
        from ..quant_q4 import Q4Weight, dequantize_q4

        rows = _deinterleave(self.data, out_f, in_f // CHUNK, CHUNK // 2 + 4)
        sm = rows[..., :4].contiguous().view(torch.float16)  # (out, n, 2)
        codes = rows[..., 4:].reshape(out_f, in_f // 2)
        return dequantize_q4(Q4Weight(codes, sm[..., 0], sm[..., 1], CHUNK))

    def _struct(self) -> _Weight:
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return _Weight(FORMATS[self.fmt], self.out_features, self.in_features, self.group_size, self.data.data_ptr(),
                       ptr(self.scale), None, ptr(self.bias))


def _bias(bias):
    return None if bias is None else bias.detach().float().contiguous()


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer: q, k, v rows stacked in ``qkv``; gate rows then up rows in ``gate_up``;
    the two RMSNorm weights (d,)."""

    qkv: LinearWeight
    o: LinearWeight
    gate_up: LinearWeight
    down: LinearWeight
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor


@dataclass
class CacheBinding:
    """A pool's per-layer buffers as the C call takes them (``NativeStep.bind``)."""

    k: list
    v: list
    pos: list
    capacity: int
    rows: int
    _ptrs: tuple = ()


def _linear_check(name: str, w: LinearWeight, out_f: int, in_f: int) -> None:
    if (w.out_features, w.in_features) != (out_f, in_f):
        raise Unavailable(f"{name}: weight is {w.out_features}x{w.in_features}, the shape needs {out_f}x{in_f}")
    if in_f % CHUNK:
        raise Unavailable(f"{name}: {out_f}x{in_f} is not served (inputs must be a multiple of {CHUNK})")
    if w.data.device.type != "cpu":
        raise Unavailable(f"{name}: weights on {w.data.device}, the native step runs on the CPU")


class NativeStep:
    """The decode step of a Llama-family model in one C call per step.

    Parameters
    ----------
    shape : StepShape
    layers : one ``LayerWeights`` per layer (kept alive here: the C side holds their pointers).
    dtype : torch.float32 or torch.bfloat16, the activations' and the cache's dtype.
    final_norm, head : optional; with both, a call also returns the logits (B, vocab) float32 of
        the final RMSNorm and the LM head (a ``LinearWeight``).

    Raises ``Unavailable`` when the library cannot be built or loaded, or the shape or a weight is
    not served.
    """

    def __init__(self, shape: StepShape, layers: list[LayerWeights], dtype: torch.dtype,
                 final_norm: torch.Tensor | None = None, head: LinearWeight | None = None,
                 defines: tuple[str, ...] = ()):
        lib = library(defines)
        if lib is None:
            raise Unavailable(why_not(defines))
        if dtype not in (torch.float32, torch.bfloat16):
            raise Unavailable(f"activations in {dtype}: the native step runs float32 or bfloat16")
        if len(layers) != shape.n_layers:
            raise Unavailable(f"{len(layers)} layers given, the shape has {shape.n_layers}")
        s = shape
        if (s.n_kv_heads < 1 or s.n_heads % s.n_kv_heads or s.head_dim % 16 or s.head_dim > 512 or s.d_model % 32
                or s.d_ff % 32):
            raise Unavailable(f"shape not served: {s} (heads % kv heads, head_dim % 16 and <= 512, d_model and d_ff % 32)")
        for i, lw in enumerate(layers):
            _linear_check(f"layer {i} qkv", lw.qkv, s.qkv_out, s.d_model)
            _linear_check(f"layer {i} o", lw.o, s.d_model, s.n_heads * s.head_dim)
            _linear_check(f"layer {i} gate_up", lw.gate_up, 2 * s.d_ff, s.d_model)
            _linear_check(f"layer {i} down", lw.down, s.d_model, s.d_ff)
        if (final_norm is None) != (head is None):
            raise ValueError("final_norm and head go together")
        if head is not None:
            _linear_check("head", head, head.out_features, s.d_model)
        self.lib, self.shape, self.dtype = lib, shape, dtype
        # the int8 and 4-bit weights are copies made for these kernels: this step's own, in one mapping in huge pages,
        # in the order a step reads them (the stock weights of a dense step are the model's, homed by load_model)
        mats = [w for lw in layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down)] + ([] if head is None else [head])
        packed = [w for w in mats if w.fmt in ("i8", "q4")]
        own = dict(zip(map(id, packed), (replace(w, data=d) for w, d in zip(packed, arena.copies(w.data for w in packed)))))
        mine = lambda w: own.get(id(w), w)  # noqa: E731
        norm = lambda t: t.detach().float().contiguous()  # noqa: E731
        self.layers = [LayerWeights(mine(lw.qkv), mine(lw.o), mine(lw.gate_up), mine(lw.down), norm(lw.attn_norm),
                                    norm(lw.mlp_norm)) for lw in layers]
        self.final_norm = None if final_norm is None else norm(final_norm)
        self.head = None if head is None else mine(head)
        self._shape = _Shape(s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff,
                             int(dtype == torch.bfloat16), s.eps, s.attn_scale)
        self._layers = (_Layer * s.n_layers)(*[
            _Layer(lw.qkv._struct(), lw.o._struct(), lw.gate_up._struct(), lw.down._struct(),
                   lw.attn_norm.data_ptr(), lw.mlp_norm.data_ptr()) for lw in self.layers])
        self._head = None if head is None else self.head._struct()
        self._shape_ptr, self._layers_ptr = ctypes.addressof(self._shape), ctypes.addressof(self._layers)
        self._head_ptr = None if self._head is None else ctypes.addressof(self._head)
        self._final_norm_ptr = None if self.final_norm is None else self.final_norm.data_ptr()
        self._scratch = torch.empty(0, dtype=torch.uint8)
        rc = lib.qs_step_check(self._shape_ptr, self._layers_ptr)
        if rc:
            raise Unavailable(f"the native step refused the model: {ERRORS.get(rc, rc)}")

    @property
    def rounds_matmul_inputs(self) -> bool:
        """Whether the matmuls of weights other than float32 see their input rows rounded to bfloat16
        (bfloat16 activations on a CPU with AVX-512 BF16: the step's bfloat16 dot products), as
        ``reference_step(..., round_inputs=)`` does."""
        return self.dtype == torch.bfloat16 and bool(self.lib.qs_step_bf16_dot())

    @property
    def weight_bytes(self) -> int:
        """Weight bytes one step reads (the head included when there is one)."""
        total = sum(w.nbytes for lw in self.layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down))
        return total + (0 if self.head is None else self.head.nbytes)

    def matmuls_only(self, rows: int) -> None:
        """The step's matmuls alone on ``rows`` rows of zeros, threaded as the step runs them (benchmarks:
        a step's time minus this is its glue)."""
        rc = self.lib.qs_step_matmuls(ctypes.addressof(self._shape), ctypes.addressof(self._layers), rows,
                                      None if self._head is None else ctypes.addressof(self._head))
        if rc:
            raise RuntimeError(f"native step failed: {ERRORS.get(rc, rc)}")

    def bind(self, k: list[torch.Tensor], v: list[torch.Tensor], pos: list[torch.Tensor]) -> CacheBinding:
        """A pool's buffers (``CachePool.k``, ``.v``, ``.pos``: per layer (P, Hkv, cap, hd) and (P, cap)),
        checked once; keep the result as long as the pool."""
        s = self.shape
        if not (len(k) == len(v) == len(pos) == s.n_layers):
            raise ValueError(f"expected {s.n_layers} layers of cache buffers")
        P, Hkv, cap, hd = k[0].shape
        for kk, vv, pp in zip(k, v, pos):
            if (kk.shape != (P, s.n_kv_heads, cap, s.head_dim) or vv.shape != kk.shape or pp.shape != (P, cap)
                    or kk.dtype != self.dtype or vv.dtype != self.dtype or pp.dtype != torch.long
                    or not (kk.is_contiguous() and vv.is_contiguous() and pp.is_contiguous())
                    or kk.device.type != "cpu"):
                raise ValueError("cache buffers must be contiguous CPU tensors (P, Hkv, cap, hd) of the step's "
                                 "dtype, with int64 positions (P, cap)")
        arr = lambda ts: (_P * s.n_layers)(*[t.data_ptr() for t in ts])  # noqa: E731
        return CacheBinding(list(k), list(v), list(pos), cap, P, (arr(k), arr(v), arr(pos)))

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 slots, counts, cache: CacheBinding, out: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of B rows.

        h (B, d) in the step's dtype, contiguous: overwritten with the last layer's output.
        cos, sin (B, head_dim): the model's rotary tables at the rows' positions (as
        transformers' rotary module returns them; any float dtype). positions (B,) int64.
        slots (B,): each row's pool row; counts (B,) or (n_layers, B): the row's live entries
        per layer, where its new entry goes (must be < the pool's capacity). Lists or tensors.
        out: where to write the logits (B, vocab) float32 (default: a new tensor).
        Returns the logits when the step has a head, else ``h``. Not thread-safe: one step at a time
        per ``NativeStep`` (its scratch buffer is reused from call to call).
        """
        B = h.shape[0]
        s = self.shape
        if h.dtype != self.dtype or h.shape != (B, s.d_model) or not h.is_contiguous():
            raise ValueError(f"h must be a contiguous ({B}, {s.d_model}) {self.dtype} tensor")
        cos, sin, positions = _f32_rows(cos, B, s.head_dim), _f32_rows(sin, B, s.head_dim), positions
        if positions.dtype != torch.long or positions.shape != (B,) or not positions.is_contiguous():
            positions = positions.reshape(B).to(torch.long).contiguous()
        slot_list, count_list = _ints(slots), _ints(counts)
        per_layer = len(count_list) == s.n_layers * B and len(count_list) != B
        if len(slot_list) != B or len(count_list) not in (B, s.n_layers * B):
            raise ValueError(f"slots must be ({B},) and counts ({B},) or ({s.n_layers}, {B})")
        if B and (max(count_list) >= cache.capacity or min(count_list) < 0 or max(slot_list) >= cache.rows
                  or min(slot_list) < 0):
            raise ValueError(f"a row's cache is full or out of the pool (capacity {cache.capacity}, {cache.rows} rows)")
        logits = None
        if self.head is not None:
            logits = out if out is not None else torch.empty(B, self.head.out_features, dtype=torch.float32)
            if logits.shape != (B, self.head.out_features) or logits.dtype != torch.float32 or not logits.is_contiguous():
                raise ValueError(f"out must be a contiguous ({B}, {self.head.out_features}) float32 tensor")
        if B == 0:
            return h if logits is None else logits
        need = self.lib.qs_step_scratch_bytes(self._shape_ptr, B, max(count_list))
        if self._scratch.numel() < need:  # grown, never shrunk: a decode loop allocates nothing per step
            self._scratch = torch.empty(max(need, 2 * self._scratch.numel()), dtype=torch.uint8)
        k, v, p = cache._ptrs
        rc = self.lib.qs_step(self._shape_ptr, self._layers_ptr, k, v, p, cache.capacity, B,
                              (ctypes.c_int32 * B)(*slot_list), (ctypes.c_int32 * len(count_list))(*count_list),
                              B if per_layer else 0, positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), h.data_ptr(),
                              self._final_norm_ptr, self._head_ptr, None if logits is None else logits.data_ptr(),
                              self._scratch.data_ptr(), self._scratch.numel())
        if rc:
            raise RuntimeError(f"native step failed: {ERRORS.get(rc, rc)}")
        return h if logits is None else logits


def _f32_rows(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t`` as contiguous float32 (rows, cols), without a copy when it is one already."""
    if t.dtype == torch.float32 and t.shape == (rows, cols) and t.is_contiguous():
        return t
    return t.reshape(rows, cols).float().contiguous()


def _ints(x) -> list[int]:
    """A list, tuple, range or integer tensor as a flat list of ints."""
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return [int(v) for row in x for v in (row if isinstance(row, (list, tuple, range)) else (row,))]


PHASES = ("norm + qkv", "attention", "merge", "o + residual", "norm + gate_up + SiLU", "down + residual", "head", "total")


def phase_seconds(step: NativeStep, reset: bool = False) -> dict[str, float] | None:
    """Seconds spent in each phase of the steps run so far (thread 0's clock, waits included), for a
    step built with ``defines=("QS_TIMING=1",)``; None for any other build."""
    try:
        arr = (ctypes.c_double * len(PHASES)).in_dll(step.lib, "qs_phase_seconds")
    except ValueError:
        return None
    out = dict(zip(PHASES, arr))
    if reset:
        for i in range(len(PHASES)):
            arr[i] = 0.0
    return out


def matmul(weight: LinearWeight, x: torch.Tensor, defines: tuple[str, ...] = ()) -> torch.Tensor:
    """x (R, in) float32 @ W^T (+ bias) -> (R, out) float32 with the step's kernels (tests, benchmarks)."""
    lib = library(defines)
    if lib is None:
        raise Unavailable(why_not(defines))
    _linear_check("weight", weight, weight.out_features, weight.in_features)
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], weight.out_features)
    if x.shape[0]:
        w = weight._struct()
        rc = lib.qs_matmul(ctypes.addressof(w), x.data_ptr(), x.shape[0], y.data_ptr())
        if rc:
            raise RuntimeError(f"native matmul failed: {ERRORS.get(rc, rc)}")
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in float32: (x * rsqrt(mean(x^2) + eps)) * weight."""
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * weight.float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, hd) with (B, hd) tables, transformers' half-split layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


@torch.no_grad()
def reference_step(shape: StepShape, layers: list[LayerWeights], h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, slots, counts, k: list[torch.Tensor], v: list[torch.Tensor],
                   pos: list[torch.Tensor], final_norm: torch.Tensor | None = None,
                   head: LinearWeight | None = None, round_inputs: bool = False) -> torch.Tensor:
    """``NativeStep.__call__`` with torch ops: the same arguments (cache buffers as lists), the same
    writes into the cache, the same float32 arithmetic (weights dequantized to float32; K/V rounded
    to the cache's dtype when written; with ``round_inputs``, the input rows of each matmul whose weight
    is not float32 rounded to bfloat16, as ``NativeStep.rounds_matmul_inputs`` says the step does). Returns the logits
    (float32) with a head, else the new h (h itself is not modified)."""
    s = shape
    B = h.shape[0]
    slots = torch.as_tensor(slots).long().reshape(B)
    counts = torch.as_tensor(counts).long()
    counts = counts.expand(s.n_layers, B) if counts.dim() == 1 else counts
    cos, sin = cos.reshape(B, s.head_dim).float(), sin.reshape(B, s.head_dim).float()
    x = h.float()
    qd, kd, G = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_heads // s.n_kv_heads
    rnd = lambda w, t: t.bfloat16().float() if round_inputs and w.fmt != "f32" else t  # noqa: E731
    lin = lambda w, t: torch.nn.functional.linear(rnd(w, t), w.dequantized(), w.bias)  # noqa: E731
    for l, lw in enumerate(layers):
        qkv = lin(lw.qkv, rms_norm(x, lw.attn_norm, s.eps))
        q, kk, vv = qkv.split([qd, kd, kd], dim=-1)
        q = rotate(q.reshape(B, s.n_heads, s.head_dim), cos, sin)
        kk = rotate(kk.reshape(B, s.n_kv_heads, s.head_dim), cos, sin)
        vv = vv.reshape(B, s.n_kv_heads, s.head_dim)
        outs = []
        for b in range(B):
            slot, n = int(slots[b]), int(counts[l, b])
            k[l][slot, :, n] = kk[b].to(k[l].dtype)
            v[l][slot, :, n] = vv[b].to(v[l].dtype)
            pos[l][slot, n] = positions[b]
            keys = k[l][slot, :, : n + 1].float().repeat_interleave(G, dim=0)  # (H, n+1, hd)
            values = v[l][slot, :, : n + 1].float().repeat_interleave(G, dim=0)
            p = torch.softmax((keys @ q[b][:, :, None]).squeeze(-1) * s.attn_scale, dim=-1)  # (H, n+1)
            outs.append((p[:, None, :] @ values).reshape(qd))
        x = x + lin(lw.o, torch.stack(outs))
        gate, up = lin(lw.gate_up, rms_norm(x, lw.mlp_norm, s.eps)).chunk(2, dim=-1)
        x = x + lin(lw.down, torch.nn.functional.silu(gate) * up)
    if head is not None:
        return lin(head, rms_norm(x, final_norm, s.eps))
    return x.to(h.dtype)
