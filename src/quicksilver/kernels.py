"""Weight-only low-bit matmul kernels over one nested int8 copy, chosen per shape by measurement.

A weight is stored once as signed int8 codes q (per output channel, or per group of input
channels) and, for the CPU's int4 kernel, as two nibble planes of the same codes:

    q = 16 * hi + lo,   hi = q >> 4 in [-8, 7] (arithmetic shift),   lo = q & 15 in [0, 15]

The int4 precision is the high plane alone (MatQuant's most-significant-bit slice, with the
bucket's midpoint as rounding offset: 16 * hi + 8), so an int4 step reads half the bytes of
an int8 step; the int2 precision is q >> 6 (64 * top + 32), which no kernel here serves fast.

Kernels that one dispatch chooses between compute the same function: the same weight values
(the codes times the scales), activations kept in the model's dtype (weight-only: no
activation quantization), each row independent of the others in the call. They differ only
in float rounding. Which kernel is fastest depends on the machine and the number of rows
(weight-only int8 beats bfloat16 at one row and loses badly at 512 on the machines we
measured), so the choice is measured on this machine at first use and cached in
``$QUICKSILVER_CACHE/kernels/`` (``measure_kernels`` redoes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import native
from .hardware import cpu_flags, cpu_model
from .native import step as native_step
from .quant import slice_codes

ROW_BUCKETS = (1, 8, 64, 512)
INT4_GROUPS = (32, 64, 128, 256)  # group sizes the CPU int4 kernel accepts


@dataclass
class NestedWeight:
    """One int8 copy of a (out, in) weight, its scales (out, groups), and lazily built kernel layouts.

    ``group_size`` None means one scale per output channel.
    """

    codes: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out, groups) float32
    group_size: int | None
    bias: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def on_cpu(self) -> bool:
        return self.codes.device.type == "cpu"

    def dequantized(self, bits: int, dtype: torch.dtype) -> torch.Tensor:
        """The float weight of the ``bits`` slice (computed each call; ``layout`` keeps one)."""
        out_f, in_f = self.shape
        g = in_f if self.group_size is None else self.group_size
        w = slice_codes(self.codes, bits).to(dtype).reshape(out_f, in_f // g, g) * self.scales.to(dtype)[..., None]
        return w.reshape(out_f, in_f)

    def layout(self, key: str, dtype: torch.dtype):
        """A kernel's prepared operands, built once per (kernel, dtype)."""
        k = (key, dtype)
        if k not in self._cache:
            self._cache[k] = _LAYOUTS[key](self, dtype)
        return self._cache[k]

    def int4_group(self) -> int | None:
        """The group size the int4 kernel runs with, or None when it cannot serve this weight."""
        out_f, in_f = self.shape
        if out_f % 16 or in_f % 32:  # the packed layout's tiles
            return None
        if self.group_size is not None:
            return self.group_size if self.group_size in INT4_GROUPS else None
        for g in (256, 128, 64, 32):  # per-channel scales: any accepted group, scales repeated
            if in_f % g == 0:
                return g
        return None


def _planes(w: NestedWeight):
    q = w.codes.to(torch.int32)
    return q >> 4, q & 15


def _scale_zero(w: NestedWeight, group: int, mult: float, zero: float, dtype) -> torch.Tensor:
    """The int4 kernel's (groups, out, 2) table: value = (u - 8) * scale + zero, per group."""
    out_f, in_f = w.shape
    per = w.scales if w.group_size is not None else w.scales.expand(out_f, in_f // group)
    s = per * mult
    return torch.stack([s, per * zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def _layout_int4(w: NestedWeight, dtype):
    hi, _ = _planes(w)
    g = w.int4_group()
    packed = torch._convert_weight_to_int4pack_for_cpu((hi + 8).contiguous(), 2)
    return packed, g, _scale_zero(w, g, 16.0, 8.0, dtype)


def _layout_planes8(w: NestedWeight, dtype):
    hi, lo = _planes(w)
    g = w.int4_group()
    packed_hi = torch._convert_weight_to_int4pack_for_cpu((hi + 8).contiguous(), 2)
    packed_lo = torch._convert_weight_to_int4pack_for_cpu(lo.contiguous(), 2)
    # hi plane: (u - 8) * 16s; lo plane: (u - 8) * s + 8s = lo * s
    return packed_hi, packed_lo, g, _scale_zero(w, g, 16.0, 0.0, dtype), _scale_zero(w, g, 1.0, 8.0, dtype)


def _layout_int8pack(w: NestedWeight, dtype):
    return w.codes.contiguous(), w.scales[:, 0].to(dtype).contiguous()


def _layout_native8(w: NestedWeight, dtype):
    return w.codes.contiguous(), w.scales[:, 0].float().contiguous()


def _layout_native4(w: NestedWeight, dtype):
    return native.pack_u4(w.codes), w.scales[:, 0].float().contiguous()


_LAYOUTS = {"int4pack": _layout_int4, "planes8": _layout_planes8, "int8pack": _layout_int8pack,
            "native8": _layout_native8, "native4": _layout_native4}


def _bias(y, w):
    return y if w.bias is None else y + w.bias.to(y.dtype)


def run_int8pack(w: NestedWeight, x: torch.Tensor) -> torch.Tensor:
    codes, scales = w.layout("int8pack", x.dtype)
    return _bias(torch._weight_int8pack_mm(x, codes, scales), w)


def run_planes8(w: NestedWeight, x: torch.Tensor) -> torch.Tensor:
    hi, lo, g, sz_hi, sz_lo = w.layout("planes8", x.dtype)
    return _bias(torch._weight_int4pack_mm_for_cpu(x, hi, g, sz_hi) + torch._weight_int4pack_mm_for_cpu(x, lo, g, sz_lo), w)


def run_int4pack(w: NestedWeight, x: torch.Tensor) -> torch.Tensor:
    packed, g, sz = w.layout("int4pack", x.dtype)
    return _bias(torch._weight_int4pack_mm_for_cpu(x, packed, g, sz), w)


def run_native8(w: NestedWeight, x: torch.Tensor) -> torch.Tensor:
    codes, scales = w.layout("native8", x.dtype)
    return _bias(native.linear("i8", codes, scales, x.contiguous()), w)


def run_native4(w: NestedWeight, x: torch.Tensor) -> torch.Tensor:
    packed, scales = w.layout("native4", x.dtype)
    return _bias(native.linear("u4", packed, scales, x.contiguous()), w)


def _native_applies(w: NestedWeight, dtype) -> bool:
    """The C kernels (``quicksilver.native``): bfloat16 activations, per-channel scales, their tiles."""
    if not (w.on_cpu and dtype == torch.bfloat16 and w.group_size is None):
        return False
    return native.applies(*w.shape) and native.available()


def _layout_dequant(bits):
    return lambda w, dtype: w.dequantized(bits, dtype)


for _bits in (8, 4, 2):
    _LAYOUTS[f"dequant{_bits}"] = _layout_dequant(_bits)


def _dequant(bits):
    # Many-row calls are compute-bound: a float matmul over the slice's values, dequantized
    # once and kept (memory traded for time: one copy of the weight in the activations' dtype).
    def run(w: NestedWeight, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w.layout(f"dequant{bits}", x.dtype), None if w.bias is None else w.bias.to(x.dtype))

    return run


# bits -> kernel name -> (runner, applies(weight, activation dtype) -> bool)
KERNELS: dict[int, dict[str, tuple]] = {
    8: {
        "dequant": (_dequant(8), lambda w, dtype: True),
        "int8pack": (run_int8pack, lambda w, dtype: w.on_cpu and w.group_size is None),
        "planes8": (run_planes8, lambda w, dtype: w.on_cpu and w.int4_group() is not None),
        "native8": (run_native8, _native_applies),
    },
    4: {
        "dequant": (_dequant(4), lambda w, dtype: True),
        "int4pack": (run_int4pack, lambda w, dtype: w.on_cpu and w.int4_group() is not None),
        "native4": (run_native4, _native_applies),
    },
    2: {"dequant": (_dequant(2), lambda w, dtype: True)},
}

# Bytes of weights each kernel reads per call, per weight element (scales aside); None: the
# activations' element size (the dequantized copy).
BYTES_PER_WEIGHT = {"dequant": None, "int8pack": 1.0, "planes8": 1.0, "int4pack": 0.5, "native8": 1.0,
                    "native4": 0.5, "torch": None, "native16": None}


def bytes_read(kernel: str, n_weights: int, dtype: torch.dtype) -> float:
    """Weight bytes one call of ``kernel`` reads."""
    per = BYTES_PER_WEIGHT[kernel]
    return n_weights * (torch.empty(0, dtype=dtype).element_size() if per is None else per)


def candidates(w: NestedWeight, bits: int, dtype: torch.dtype = torch.float32) -> list[str]:
    """The kernels that can run the ``bits`` slice of ``w`` on activations of ``dtype``."""
    return [name for name, (_, applies) in KERNELS[bits].items() if applies(w, dtype)]


NEAR_TIE = 0.05  # timings within 5% of the fastest count as a tie (the measured runs' noise is of that order)
UNMEASURED_PACKED_MAX = 1 << 20  # weights (elements) up to which unmeasured choices run the packed kernels


def _unmeasured_choice(names: list[str], rows: int, weights: int = 0) -> str:
    # Tests: every kernel computes the same function, so correctness tests need no timing. Decode-
    # sized calls take the native kernel where it applies (so the suite runs it), else the first
    # packed one on test-sized weights; larger calls, and a real model's weights (the packed CPU
    # kernels take ms per call on float32 there), the dequantized matmul. Each kernel is also
    # tested on its own (test_kernels), the dispatch too.
    if rows > 8:
        return names[0]
    if weights > UNMEASURED_PACKED_MAX and not any(n.startswith("native") for n in names):
        return names[0]
    natives = [n for n in names if n.startswith("native")]
    return natives[0] if natives else names[min(1, len(names) - 1)]


def bucket(rows: int) -> int:
    """The measured row count closest to ``rows`` on a log scale."""
    import math

    return min(ROW_BUCKETS, key=lambda b: abs(math.log(max(rows, 1) / b)))


def time_call(fn, reps: int = 7, budget_s: float = 0.05) -> float:
    """Median seconds of ``fn()`` after one warm-up call, at most ``reps`` runs or ``budget_s``."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


COLD_ROWS = 8  # calls of at most this many rows are timed with weights out of cache


def _last_level_cache_bytes() -> int:
    from pathlib import Path

    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    except (OSError, ValueError):
        return 32 << 20


def cold_copies(weight_bytes: int, limit: int = 64) -> int:
    """How many copies of a weight to cycle through so that each call reads it from memory.

    A decode step reads every weight of the model once, from DRAM; one matrix timed in a loop
    stays in cache and measures another machine (the last-level cache is as big as a layer).
    """
    return max(1, min(limit, -(-2 * _last_level_cache_bytes() // max(weight_bytes, 1))))


def _cycle(items):
    state = {"i": 0}

    def nxt():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return nxt


def measure_shape(w: NestedWeight, bits: int, dtype: torch.dtype, rows=ROW_BUCKETS) -> dict[int, dict[str, float]]:
    """Microseconds of every applicable kernel at each row count, one kernel after another (median of a few runs each).

    Decode-sized calls (<= ``COLD_ROWS`` rows) cycle through copies of the weight larger than the
    last-level cache together, as in a real decode step.
    """
    names = candidates(w, bits, dtype)
    out = {}
    for n in rows:
        x = torch.randn(n, w.shape[1], dtype=dtype, device=w.codes.device)
        copies = [w]
        if n <= COLD_ROWS:
            copies += [NestedWeight(w.codes.clone(), w.scales.clone(), w.group_size, w.bias)
                       for _ in range(cold_copies(w.codes.numel()) - 1)]
        out[n] = {}
        for name in names:
            run = KERNELS[bits][name][0]
            for c in copies:  # layouts built (and the newest copies cached) before timing starts
                run(c, x)
            nxt = _cycle(copies)
            out[n][name] = time_call(lambda: run(nxt(), x)) * 1e6
            for c in copies[1:]:
                c._cache.clear()
    return out


class KernelTable:
    """The measured choice: (out, in, group, bits, dtype) x row bucket -> kernel name, cached on disk."""

    def __init__(self, path=None):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}

    @staticmethod
    def key(w: NestedWeight, bits: int, dtype: torch.dtype) -> str:
        return f"{w.shape[0]}x{w.shape[1]}/g{w.group_size}/b{bits}/{str(dtype).removeprefix('torch.')}"

    def choose(self, w: NestedWeight, bits: int, rows: int, dtype: torch.dtype) -> str:
        names = candidates(w, bits, dtype)
        if len(names) == 1:
            return names[0]
        if os.environ.get("QUICKSILVER_KERNELS") == "unmeasured":
            return _unmeasured_choice(names, rows, w.codes.numel())
        b = bucket(rows)
        return self.fastest(self.key(w, bits, dtype), str(b), names, lambda: measure_shape(w, bits, dtype, rows=(b,))[b])

    def fastest(self, key: str, cell: str, names: list[str], measure) -> str:
        """The fastest of ``names`` in the table's ``key``/``cell``, measured (``measure()`` -> name -> us)
        and saved when missing: for the shapes and row counts this process meets, one cell at a time,
        and again when a kernel was added since (a native build that was missing then)."""
        timings = self.entries.setdefault(key, {}).get(cell)
        if timings is None or not set(names) <= set(timings):
            timings = self.entries[key][cell] = measure()
            self.save()
        best = min(t for name, t in timings.items() if name in names)
        # a near-tie goes to the first of ``names`` (a fixed preference), so that measuring again cannot flip a
        # choice between kernels within noise of each other (in bfloat16 they round differently)
        return next(n for n in names if n in timings and timings[n] <= best * (1 + NEAR_TIE))

    def choose_dense(self, weight: torch.Tensor, rows: int, dtype: torch.dtype) -> str:
        """The kernel for a full-precision linear (the stock weights) at ``rows`` rows."""
        names = dense_candidates(weight, dtype)
        if len(names) == 1:
            return names[0]
        if os.environ.get("QUICKSILVER_KERNELS") == "unmeasured":
            return "native16" if rows <= 8 else "torch"
        k = f"dense/{weight.shape[0]}x{weight.shape[1]}/{str(dtype).removeprefix('torch.')}"
        b = bucket(rows)
        return self.fastest(k, str(b), names, lambda: measure_dense(weight, dtype, rows=(b,))[b])

    def save(self) -> None:
        if self.path is None:
            return
        from .results_io import write_json_atomic

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)
        except OSError:
            pass  # an unwritable cache only means measuring again next time


def machine_key() -> str:
    """What a kernel timing depends on: CPU model and features, torch version, threads."""
    feats = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))
    # the native libraries' builds (source, compiler, flags): a changed kernel or decode step is measured again
    build = native.build_id() if native.available() else "none"
    build += "+" + (native_step.build_id() if native_step.available() else "none")
    text = f"{cpu_model()}|{' '.join(feats)}|{torch.__version__}|{torch.get_num_threads()}|{build}|cold"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


_TABLE: KernelTable | None = None
_TABLE_GENERATION = 0


def kernel_table() -> KernelTable:
    """This machine's kernel table (loaded from the cache directory, measured as needed)."""
    global _TABLE
    if _TABLE is None:
        from .paths import cache_dir

        _TABLE = KernelTable(cache_dir() / "kernels" / f"{machine_key()}.json")
    return _TABLE


def set_kernel_table(table: KernelTable | None) -> None:
    """Replace this process's kernel table (tests; benchmarks that force a kernel)."""
    global _TABLE, _TABLE_GENERATION
    _TABLE = table
    _TABLE_GENERATION += 1  # choices remembered under the old table (on weights, per shape) no longer apply


def table_generation() -> int:
    """Bumped whenever the kernel table is replaced: key remembered choices by it."""
    return _TABLE_GENERATION


def matmul(w: NestedWeight, x: torch.Tensor, bits: int, kernel: str | None = None) -> torch.Tensor:
    """``x`` (n, in) times the ``bits`` slice of ``w``, through the fastest kernel measured for n rows."""
    if kernel is None:
        n = x.shape[0]
        if n == 0:
            kernel = "dequant"
        else:  # the choice per (bits, dtype, row count) is remembered on the weight: no table lookup per call
            key = ("choice", _TABLE_GENERATION, bits, x.dtype, n)
            kernel = w._cache.get(key)
            if kernel is None:
                kernel = w._cache[key] = kernel_table().choose(w, bits, n, x.dtype)
    return KERNELS[bits][kernel][0](w, x)


# --- Full-precision linears: the stock weights (the engine's ``off``) ---------------------------------
#
# The same question for the weights the model ships with: torch's matmul, or the native kernel
# over the same bfloat16 weights (float32 accumulation either way; they differ in float rounding).


def dense_candidates(weight: torch.Tensor, dtype: torch.dtype) -> list[str]:
    """``torch`` always; ``native16`` for contiguous bfloat16 CPU weights on bfloat16 activations."""
    if dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
        return ["torch"]
    if not (weight.is_contiguous() and native.applies(*weight.shape) and native.available()):
        return ["torch"]
    return ["torch", "native16"]


def _native16(x, weight, bias=None):
    y = native.linear("bf16", weight, None, x.contiguous())
    return y if bias is None else y + bias


DENSE_KERNELS = {"torch": F.linear, "native16": _native16}


def measure_dense(weight: torch.Tensor, dtype: torch.dtype, rows=ROW_BUCKETS) -> dict[int, dict[str, float]]:
    """Microseconds of each dense kernel at each row count."""
    out = {}
    for n in rows:
        x = torch.randn(n, weight.shape[1], dtype=dtype, device=weight.device)
        copies = [weight]
        if n <= COLD_ROWS:  # out of cache, as in a decode step (see ``cold_copies``)
            copies += [weight.clone() for _ in range(cold_copies(weight.nbytes) - 1)]
        out[n] = {}
        for name in dense_candidates(weight, dtype):
            f = DENSE_KERNELS[name]
            for c in copies:
                f(x, c)
            nxt = _cycle(copies)
            out[n][name] = time_call(lambda: f(x, nxt())) * 1e6
    return out


def dense(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, memo: dict) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the kernel measured fastest for this many rows.

    ``memo`` (kept by the caller, one per weight) remembers the choice per (table, dtype, rows).
    """
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if rows == 0:
        return F.linear(x, weight, bias)
    key = (_TABLE_GENERATION, x.dtype, rows)
    name = memo.get(key)
    if name is None:
        name = memo[key] = kernel_table().choose_dense(weight, rows, x.dtype)
    if name == "torch":
        return F.linear(x, weight, bias)
    return _native16(x.reshape(rows, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``, taken over float32: torch's CPU argmax over bfloat16 measured 20x slower
    (8 x 49,152 logits: 8.1 ms against 0.35 ms), and bfloat16 converts to float32 exactly, so the
    index is the same."""
    if logits.dtype in (torch.bfloat16, torch.float16) and logits.device.type == "cpu":
        logits = logits.float()
    return logits.argmax(-1)
