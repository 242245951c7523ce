"""Native decode matmuls: a small C library, built for this CPU on first use and loaded with ctypes.

Decode multiplies a few rows of activations by every weight of the model, so it is bound by the
bytes of weights read. torch's CPU kernels read them at a quarter of the machine's bandwidth
for one row (docs/RESULTS.md, the kernel table). ``qsk.c`` computes ``x @ W.T`` for bfloat16
activations over three weight formats, with float32 accumulation:

- ``bf16``: the stock weights (the engine's ``off``);
- ``i8``: int8 codes with one scale per output channel (AMQ's int8 level);
- ``u4``: the high nibble plane of the same codes, two per byte (AMQ's int4 slice:
  ``16 * (q >> 4) + 8``), so an int4 call reads half the bytes of an int8 call.

Each output element is one dot product in a fixed order, so a row's output does not depend
on the other rows of the call. The library is compiled with the system C compiler for the
machine it runs on (``-march=native``; AVX-512 BF16 kernels where the CPU has them, portable C
elsewhere) into ``$QUICKSILVER_CACHE/native/``, keyed by the source, the compiler and the CPU.
Without a compiler (or with ``QUICKSILVER_NATIVE=0``) nothing is built and the engine keeps
torch's kernels; whether the native kernels are used at all is decided by measurement
(``quicksilver.kernels``), never assumed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("qsk.c")
FORMATS = {"bf16": 0, "i8": 1, "u4": 2}
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_why_not = "not loaded yet"


def compiler() -> str | None:
    """The C compiler used: ``$CC``, else ``cc`` or ``gcc`` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _library_path(cc: str, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    from ..hardware import cpu_flags, cpu_model
    from ..paths import cache_dir

    code = source.read_bytes()
    # the local files it includes (#include "name", beside it) are part of what it is built from
    parts = [code, *((source.parent / name.decode()).read_bytes() for name in re.findall(rb'^#include "([^"]+)"', code, re.M))]
    text = b"|".join([*parts, cc.encode(), " ".join(flags).encode(), cpu_model().encode(),
                      " ".join(sorted(cpu_flags())).encode()])
    return cache_dir() / "native" / f"{source.stem}-{hashlib.sha1(text).hexdigest()[:16]}.so"


def _build(cc: str, path: Path, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> None:
    """Compile into a temporary file beside ``path``, then rename it (concurrent builds are safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError((proc.stderr.strip().splitlines() or ["compiler failed"])[-1])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: Path, flags: tuple[str, ...] = FLAGS) -> tuple[ctypes.CDLL | None, str]:
    """``source`` built for this CPU (once; kept in the cache folder) and loaded: (library, "") or
    (None, why not): ``QUICKSILVER_NATIVE=0``, no compiler, or the compiler's last error line."""
    if os.environ.get("QUICKSILVER_NATIVE") == "0":
        return None, "QUICKSILVER_NATIVE=0"
    cc = compiler()
    if cc is None:
        return None, "no C compiler (set CC)"
    try:
        path = _library_path(cc, source, flags)
        if not path.is_file():
            _build(cc, path, source, flags)
        return ctypes.CDLL(str(path)), ""  # torch is imported first, so its OpenMP runtime (libgomp.so.1) is shared
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"build failed: {e}"


@functools.lru_cache(maxsize=1)
def library():
    """The loaded library, or None when it cannot be built here (``why_not()`` says why)."""
    global _why_not
    lib, _why_not = load(SOURCE)
    if lib is None:
        return None
    lib.qs_linear.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.qs_linear.restype = ctypes.c_int
    lib.qs_features.restype = ctypes.c_int
    lib.qs_decode_attention.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 2 + \
        [ctypes.c_int] * 5 + [ctypes.c_float]
    lib.qs_decode_attention.restype = ctypes.c_int
    lib.qs_causal_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_float]
    lib.qs_causal_attention.restype = ctypes.c_int
    return lib


def build_id(source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> str:
    """What a library is built from (``source``, compiler, flags, CPU), as a short hash: the kernel
    library's by default."""
    cc = compiler()
    if cc is None:
        return "none"
    try:
        return _library_path(cc, source, flags).stem.split("-")[-1]
    except OSError:  # the source or a file it includes is missing: nothing to build from
        return "none"


def available() -> bool:
    return library() is not None


def why_not() -> str:
    """Why the native kernels are unavailable ("" when they are available)."""
    library()
    return _why_not


def describe() -> str:
    """One line for benchmark headers."""
    lib = library()
    if lib is None:
        return f"native kernels: unavailable ({_why_not})"
    return "native kernels: " + ("AVX-512 BF16" if lib.qs_features() else "portable C")


def applies(out_features: int, in_features: int) -> bool:
    """The shapes the kernels serve (tiles of 4 outputs by 64 inputs)."""
    return out_features % 4 == 0 and in_features % 64 == 0


def pack_u4(codes: torch.Tensor) -> torch.Tensor:
    """The ``u4`` operand: int8 codes (out, in) -> their high nibbles + 8, two per byte (out, in // 2).

    In each block of 64 input channels, byte j holds channel j in its low nibble and channel
    j + 32 in its high nibble (one widening load then yields 32 consecutive channels per half).
    """
    out_f, in_f = codes.shape
    u = ((codes.to(torch.int16) >> 4) + 8).to(torch.uint8).reshape(out_f, in_f // 64, 2, 32)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(out_f, in_f // 2).contiguous()


def linear(fmt: str, weight: torch.Tensor, scale: torch.Tensor | None, x: torch.Tensor,
           generic: bool = False) -> torch.Tensor:
    """``x`` (rows, in) bfloat16 times the weight in format ``fmt`` -> (rows, out) bfloat16.

    ``weight``: (out, in) bfloat16 for ``bf16``, (out, in) int8 for ``i8``, ``pack_u4`` output
    for ``u4``; ``scale`` (out,) float32 per output channel (None for ``bf16``). ``generic``
    runs the portable C path even where the AVX-512 one exists (tests compare the two).
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_why_not}")
    if x.dtype != torch.bfloat16 or not x.is_contiguous() or x.dim() != 2:
        raise ValueError("native.linear needs contiguous 2-D bfloat16 activations")
    rows, in_f = x.shape
    out_f = weight.shape[0]
    y = torch.empty(rows, out_f, dtype=torch.bfloat16)
    if rows == 0:
        return y
    rc = lib.qs_linear(FORMATS[fmt], weight.data_ptr(), 0 if scale is None else scale.data_ptr(), x.data_ptr(),
                       y.data_ptr(), rows, out_f, in_f, int(generic))
    if rc != 0:
        raise ValueError(f"native.linear: unsupported shape {tuple(weight.shape)} (needs out % 4 == 0, in % 64 == 0)")
    return y


def attention_applies(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Head-major bfloat16 keys/values (B, Hkv, T, hd) whose positions are rows of hd contiguous values."""
    return (keys.dtype == values.dtype == torch.bfloat16 and keys.device.type == "cpu" and keys.shape[-1] <= 256
            and keys.stride(-1) == values.stride(-1) == 1 and keys.stride(-2) == values.stride(-2) == keys.shape[-1])


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """One query row per sequence: q (B, H, hd) against keys/values (B, Hkv, T, hd) (strided views of a
    head-major cache are fine, see ``attention_applies``); mask (B, T) additive or None. -> (B, H * hd).

    Float32 scores, softmax and weighted sum, one rounding to bfloat16 at the end.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_why_not}")
    B, H, hd = q.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    q = q.contiguous()
    m = None if mask is None else mask.float().contiguous()
    out = torch.empty(B, H * hd, dtype=torch.bfloat16)
    rc = lib.qs_decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1),
                                 values.stride(0), values.stride(1), 0 if m is None else m.data_ptr(), out.data_ptr(),
                                 B, H, Hkv, T, hd, float(scale))
    if rc != 0:
        raise ValueError(f"native.decode_attention: unsupported shape (H={H}, Hkv={Hkv}, hd={hd}, T={T})")
    return out


def causal_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Prefill attention in C: bfloat16 on CPU, head dim 64, the AVX-512 BF16 build."""
    lib = library()
    return (lib is not None and bool(lib.qs_features()) and q.dtype == k.dtype == torch.bfloat16
            and q.device.type == "cpu" and q.shape[-1] == 64 and q.shape[1] % k.shape[1] == 0)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of one sequence: q (T, H, 64), k/v (T, Hkv, 64) -> (T, H * 64), bfloat16.

    Query i sees keys 0..i. Flash style: float32 scores and online softmax per block of 32 keys,
    probabilities rounded to bfloat16 for the weighted sum (as fused attention kernels do).
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_why_not}")
    T, H, hd = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(T, H * hd, dtype=torch.bfloat16)
    rc = lib.qs_causal_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), T, H, k.shape[1], hd, float(scale))
    if rc != 0:
        raise ValueError(f"native.causal_attention: unsupported (T={T}, H={H}, Hkv={k.shape[1]}, hd={hd}, code {rc})")
    return out
