"""ONNX Runtime sessions that really run where they were asked to."""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loc3r.errors import InputError, ModelError

CPU = ("CPUExecutionProvider",)
GPU = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
#: op types whose presence on the CPU means a GPU session is not really on the GPU
#: (shape arithmetic that ONNX Runtime places on the CPU on purpose is not among them)
COMPUTE_OPS = frozenset(
    {
        "Conv", "MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "Softmax", "LayerNormalization",
        "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
        "Attention", "MultiHeadAttention", "GroupQueryAttention", "Erf", "Gelu", "FastGelu",
    }
)  # fmt: skip


def distribution(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_onnxruntime() -> Any:
    """``onnxruntime`` (the CPU or the GPU build), or a clear error saying which to install;
    both builds side by side (they overwrite each other's files) is refused."""
    if distribution("onnxruntime") and distribution("onnxruntime-gpu"):
        raise InputError(
            "both onnxruntime and onnxruntime-gpu are installed, and they overwrite each other's files",
            "pip uninstall -y onnxruntime onnxruntime-gpu, then install one: pip install -e '.[cpu]' or '.[gpu]'",
        )
    try:
        import onnxruntime
    except ImportError:
        raise InputError(
            "ONNX Runtime is not installed",
            "pip install -e '.[cpu]' (CPU) or '.[gpu]' (x86 GPU); on a Jetson install the jetson-ai-lab onnxruntime-gpu wheel",
        ) from None
    return onnxruntime


def nvinfer_error(major: int = 10) -> str | None:
    """None when TensorRT's ``libnvinfer.so.<major>`` loads in this process, else why not.

    ONNX Runtime lists the TensorRT EP whenever it was built with it and only loads
    ``libnvinfer`` when a session asks for the EP; where that fails it falls back to CUDA.
    pip's TensorRT keeps the library in the ``tensorrt_libs`` package, which loads it when
    imported (as ``import tensorrt`` does): that route is taken before giving up."""
    name = f"libnvinfer.so.{major}"
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        return None
    except OSError as exc:
        first = str(exc)
    if importlib.util.find_spec("tensorrt_libs") is not None:
        try:
            import tensorrt_libs

            ctypes.CDLL(str(Path(tensorrt_libs.__file__).parent / name), mode=ctypes.RTLD_GLOBAL)
            return None
        except (ImportError, OSError) as exc:
            return f"{name} does not load, not even from the tensorrt_libs package ({exc})"
    return f"{name} does not load ({first})"


def provider_names(providers: Sequence[Any]) -> list[str]:
    """Names of providers given as names or ``(name, options)`` pairs."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def session_options(threads: int | None = None, arena: bool = False) -> Any:
    """Session options for a process that opens its graphs once and runs them for one user.

    - CPU memory arena off unless ``arena``: the arena keeps every block a run grew, so a
      fresh process's peak RSS grows with the largest activations ever seen (issue 26
      measured 1.1-1.3 GiB with it vs 0.3-0.4 GiB without on the small preset, the LLM's
      prefill the largest); without it, freed blocks go back. CUT3R's step, run once per
      frame at one shape, keeps its arena: its blocks are reused frame after frame instead
      of being mapped and faulted in again (small preset, 2 threads on one CPU: 0.280 vs
      0.347 CPU-s per frame, ``python -m loc3r.bench.cut3r_profile`` at fddfae2). The
      batched graphs (CUT3R's encoder, the vision tower) would keep a whole batch's
      activations: with their arenas on too, a fresh ``loc3r-run`` peaked at 1634 MiB
      instead of 729 MiB for no further speed.
    - Intra-op threads not spinning between runs: on a shared or loaded machine a spinning
      pool burns CPU that the decoder thread and the other graphs need.
    - ``threads``: intra-op threads of this session. By default ONNX Runtime's choice, except
      in a process confined to fewer CPUs than the machine has (``taskset``, a container's
      cpuset): ONNX Runtime then still sizes its pool by the machine and pins the pool's
      threads to CPUs outside the process's set, so the pool gets one thread per allowed
      CPU instead (``confined_threads``). Each session keeps its own pool: ONNX Runtime's process-wide pool would refuse every later
      session with per-session threads in the same process (tests, benchmarks, a server).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = threads or confined_threads()
    if threads:
        options.intra_op_num_threads = threads
    return options


def confined_threads() -> int | None:
    """The number of CPUs this process may run on when it is fewer than the machine has,
    else None (ONNX Runtime's own choice is right)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return allowed if allowed and allowed < (os.cpu_count() or allowed) else None


def open_session(
    path: str | Path, providers: Sequence[Any] = CPU, threads: int | None = None, options: Any = None, arena: bool = False
) -> Any:
    """An ``InferenceSession`` on every provider asked for, or a clear error.

    ``options`` default to :func:`session_options` (``threads`` and ``arena`` apply to those).
    onnxruntime-gpu falls back to the CPU silently when CUDA or TensorRT is missing;
    this refuses that instead.
    """
    ort = import_onnxruntime()
    options = options or session_options(threads, arena)
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    missing = [p for p in provider_names(providers) if p not in session.get_providers()]
    if missing:
        raise ModelError(
            f"onnxruntime could not use {', '.join(missing)} for {Path(path).name} (active: {', '.join(session.get_providers())})",
            "install the onnxruntime build for this device (onnxruntime-gpu with CUDA/TensorRT), or use the CPU",
        )
    return session


def open_gpu_session(path: str | Path, providers: Sequence[Any], feeds: Mapping[str, np.ndarray]) -> Any:
    """A session on GPU providers, run once at creation on ``feeds`` with profiling on, and
    refused if any compute node of the graph ran on the CPU (onnxruntime-gpu puts nodes
    its GPU providers reject on the CPU without a word)."""
    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="loc3r-ort-profile-") as folder:
        options = session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "placement")
        session = open_session(path, providers, options=options)
        session.run(None, dict(feeds))
        placement = node_placement(Path(session.end_profiling()))
    check_on_gpu(Path(path).name, placement)
    return session


def node_placement(profile: Path) -> collections.Counter[tuple[str, str]]:
    """(provider, op type) -> nodes run, from an ONNX Runtime profile."""
    events = json.loads(profile.read_text(encoding="utf-8"))
    return collections.Counter(
        (event["args"]["provider"], event["args"]["op_name"])
        for event in events
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and "provider" in event.get("args", {})
    )


def check_on_gpu(graph: str, placement: Mapping[tuple[str, str], int]) -> None:
    """Refuse a placement that runs compute nodes on the CPU."""
    on_cpu = sorted({op for (provider, op), count in placement.items() if provider == "CPUExecutionProvider" and op in COMPUTE_OPS and count})
    if on_cpu:
        total = sum(c for (provider, op), c in placement.items() if provider == "CPUExecutionProvider" and op in COMPUTE_OPS)
        raise ModelError(
            f"{graph}: {total} compute node(s) ({', '.join(on_cpu)}) run on the CPU although a GPU provider was asked for",
            "install an onnxruntime-gpu build whose CUDA/TensorRT providers work on this device (see loc3r-doctor), "
            "or export with --target cpu to run on the CPU",
        )
