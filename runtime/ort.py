"""ONNX Runtime sessions that really run where they were asked to."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loc3r.errors import ModelError

CPU = ("CPUExecutionProvider",)


def provider_names(providers: Sequence[Any]) -> list[str]:
    """Names of providers given as names or ``(name, options)`` pairs."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def open_session(path: str | Path, providers: Sequence[Any] = CPU, threads: int | None = None) -> Any:
    """An ``InferenceSession`` on every provider asked for, or a clear error.

    onnxruntime-gpu falls back to the CPU silently when CUDA or TensorRT is missing;
    this refuses that instead.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    missing = [p for p in provider_names(providers) if p not in session.get_providers()]
    if missing:
        raise ModelError(
            f"onnxruntime could not use {', '.join(missing)} for {Path(path).name} (active: {', '.join(session.get_providers())})",
            "install the onnxruntime build for this device (onnxruntime-gpu with CUDA/TensorRT), or use the CPU",
        )
    return session
