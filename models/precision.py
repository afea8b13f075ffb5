"""Which device and dtype the PyTorch model runs in, and why.

- ``--dtype`` given: that dtype.
- CUDA: the checkpoint's dtype (LLaVA-Video-7B is bfloat16: ~17 GB instead of ~34 GB).
- CPU with bfloat16 units (AVX512-BF16 or AMX) and a bfloat16 checkpoint: bfloat16, which
  those units run natively at half of float32's memory.
- Other CPUs: float32 (the exact reference, and the fastest PyTorch CPU path without
  bfloat16 units) when its weights fit in 3/4 of the memory available now; else the
  checkpoint's 16-bit dtype (bfloat16 for a float32 checkpoint), so that the model fits.

The checkpoint's dtype is the one holding most of the bundle's weight bytes, read from the
safetensors headers without loading anything.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loc3r.errors import InputError
from loc3r.models.config import DTYPE_CHOICES
from loc3r.models.convert_stream import read_safetensors_header

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_CHOICES if name != "auto"}
FIT_FRACTION = 0.75  # of the memory available now, for float32 weights on a CPU
GB = 1e9


@dataclass(frozen=True)
class Precision:
    """Where and in which dtype the PyTorch model runs, with the reason in words."""

    dtype: torch.dtype
    device: torch.device
    reason: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class WeightStats:
    """Parameter count and the dtype holding most bytes, from safetensors headers."""

    parameters: int
    dtype: torch.dtype


def weight_stats(files: list[Path], fix: str) -> WeightStats:
    """Count the floating parameters of ``files`` and find their dominant dtype (an
    unreadable file is a one-line ``ModelError`` ending in ``fix``)."""
    by_dtype: dict[torch.dtype, int] = {}
    for path in files:
        for info in read_safetensors_header(path, fix).values():
            if info.dtype.is_floating_point:
                by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + math.prod(info.shape)
    if not by_dtype:
        return WeightStats(0, torch.float32)
    dominant = max(by_dtype, key=lambda d: by_dtype[d] * d.itemsize)
    return WeightStats(sum(by_dtype.values()), dominant)


def choose_precision(
    stats: WeightStats,
    requested: str = "auto",
    device: torch.device | None = None,
    available_bytes: int | None = None,
    cpu_bf16: bool | None = None,
) -> Precision:
    """The device and dtype for a model of ``stats`` (see the module docstring).

    ``device`` defaults to CUDA when available; ``available_bytes`` to the memory available
    now; ``cpu_bf16`` to whether this CPU has bfloat16 units.
    """
    if requested not in DTYPE_CHOICES:
        raise InputError(f"--dtype {requested!r} is not known", f"use one of {', '.join(DTYPE_CHOICES)}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = stats.dtype if stats.dtype in DTYPES.values() else torch.float32
    name = str(checkpoint).removeprefix("torch.")
    if requested != "auto":
        return Precision(DTYPES[requested], device, f"--dtype {requested}")
    if device.type != "cpu":
        return Precision(checkpoint, device, f"{device.type}: the checkpoint's {name}")
    if cpu_bf16 is None:
        cpu_bf16 = has_cpu_bf16()
    if cpu_bf16 and checkpoint == torch.bfloat16:
        return Precision(checkpoint, device, "cpu with bfloat16 units: the checkpoint's bfloat16, natively, at half of float32's memory")
    available = available_memory_bytes() if available_bytes is None else available_bytes
    fp32_bytes = stats.parameters * 4
    if fp32_bytes <= FIT_FRACTION * available:
        return Precision(torch.float32, device, f"cpu: float32 (exact reference; {_size(fp32_bytes)} of weights, "
                                                f"{_size(available)} available)")
    fallback = checkpoint if checkpoint != torch.float32 else torch.bfloat16
    fallback_name = str(fallback).removeprefix("torch.")
    return Precision(fallback, device, f"cpu: {fallback_name}, as float32 weights ({_size(fp32_bytes)}) would not fit "
                                       f"in {FIT_FRACTION:.0%} of the {_size(available)} available")


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB" if nbytes >= GB else f"{nbytes / 1e6:.0f} MB"


def has_cpu_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def available_memory_bytes() -> int:
    """``MemAvailable`` (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
