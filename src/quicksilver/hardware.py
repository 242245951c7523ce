"""What this machine runs natively, detected at run time (never assumed).

``auto`` dtype: bfloat16 where the hardware executes it natively (CUDA with bf16 support;
a CPU with AVX-512 BF16 or AMX), float32 elsewhere. Machines differ from session to
session, so benchmarks write ``describe()`` into their headers.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC' or 'Intel(R) Xeon(R) Platinum 8480C'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_native() -> bool:
    """True when the CPU executes bfloat16 matmuls natively (AVX-512 BF16 or AMX)."""
    return any(f in cpu_flags() for f in BF16_CPU_FLAGS)


def cpu_int8_dot() -> bool:
    """True when the CPU has VNNI (u8 x s8 dot products into int32 without int16 saturation)."""
    return any(f in cpu_flags() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def auto_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where the hardware runs it natively, float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_bf16_native() else torch.float32


def describe(device: torch.device | str = "cpu") -> str:
    """One line for benchmark headers: CPU model, the bf16-relevant features, threads, GPU."""
    device = torch.device(device)
    feats = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in cpu_flags()]
    line = (f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"features: {' '.join(feats) or 'none of avx512/amx'})")
    if device.type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    return line
