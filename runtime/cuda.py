"""The little of CUDA the TensorRT path needs, through cuda-python: the GPU's name, compute
capability and memory, a stream, device buffers, copies and CUDA graphs.

No CUDA build of torch is needed (PyPI has none for Jetson). cuda-python is imported on
first use; without it, the device queries fall back to a CUDA torch when one is present.

Unverified here: no GPU in this project's CI; the calls follow cuda-python 12's runtime
bindings (every call returns ``(error, *values)``) and are exercised with a fake module.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from loc3r.errors import InputError, InternalError


def import_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime`` since 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise InputError(
                "cuda-python is not installed, so the TensorRT path cannot reach the GPU",
                "pip install 'cuda-python>=12' (or: pip install -e '.[tensorrt]')",
            ) from None
    return cudart


def call(cudart: Any, function: str, *args: Any) -> Any:
    """``cudart.function(*args)``, its error checked; the value(s) it returns besides the error."""
    error, *values = getattr(cudart, function)(*args)
    if error != cudart.cudaError_t.cudaSuccess:
        name = getattr(error, "name", str(error))
        raise InternalError(f"CUDA {function} failed: {name}", "check the GPU with loc3r-doctor; rerun with --debug")
    return values[0] if len(values) == 1 else tuple(values) if values else None


@dataclass(frozen=True)
class GpuInfo:
    """GPU 0 as the runtime sees it."""

    name: str
    sm: str  # compute capability without the dot: "87"
    total_bytes: int
    free_bytes: int
    source: str  # "cuda-python" or "torch"


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports, as (major, minor), read from
    ``libcuda.so.1`` itself (works when cuda-python cannot start); None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def runtime_cuda_version() -> tuple[int, int] | None:
    """The CUDA runtime version cuda-python runs (its own static one from 12.9.3, else the
    system's libcudart); None when cuda-python is missing or cannot say."""
    try:
        cudart = import_cudart()
        version = call(cudart, "cudaRuntimeGetVersion")
    except (InputError, InternalError):
        return None
    return int(version) // 1000, int(version) % 1000 // 10


def gpu_info() -> GpuInfo:
    """Name, compute capability and memory of GPU 0, from cuda-python (or a CUDA torch)."""
    try:
        cudart = import_cudart()
    except InputError:
        return _torch_gpu_info()
    if call(cudart, "cudaGetDeviceCount") < 1:
        raise InputError("no CUDA GPU is visible", "run on the target device; check the driver with loc3r-doctor")
    props = call(cudart, "cudaGetDeviceProperties", 0)
    free, total = call(cudart, "cudaMemGetInfo")
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name, f"{props.major}{props.minor}", int(total), int(free), "cuda-python")


def _torch_gpu_info() -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        raise InputError(
            "no CUDA GPU is visible (cuda-python is not installed and torch has no CUDA)",
            "install cuda-python on the device (pip install 'cuda-python>=12')",
        )
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return GpuInfo(props.name, f"{props.major}{props.minor}", int(total), int(free), "torch")


class Device:
    """One stream and the allocations made on it; everything is released by ``close``."""

    def __init__(self) -> None:
        self.cudart = import_cudart()
        flags = self.cudart.cudaStreamNonBlocking
        self.stream = call(self.cudart, "cudaStreamCreateWithFlags", flags)
        self._buffers: list[int] = []
        self._graphs: list[Any] = []
        self._graph_execs: list[Any] = []

    @property
    def stream_handle(self) -> int:
        """The stream as the integer TensorRT's ``execute_async_v3`` takes."""
        return int(self.stream)

    def alloc(self, nbytes: int) -> int:
        """A device buffer of ``nbytes`` (at least 1), freed with the device."""
        pointer = int(call(self.cudart, "cudaMalloc", max(int(nbytes), 1)))
        self._buffers.append(pointer)
        return pointer

    def upload(self, pointer: int, array: np.ndarray) -> None:
        """Host -> device on the stream (``array`` must live until the next ``synchronize``)."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        call(self.cudart, "cudaMemcpyAsync", pointer, array.ctypes.data, array.nbytes, kind, self.stream)

    def download(self, array: np.ndarray, pointer: int) -> None:
        """Device -> host into ``array`` on the stream (valid after ``synchronize``)."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        call(self.cudart, "cudaMemcpyAsync", array.ctypes.data, pointer, array.nbytes, kind, self.stream)

    def copy(self, destination: int, source: int, nbytes: int) -> None:
        """Device -> device on the stream."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        call(self.cudart, "cudaMemcpyAsync", destination, source, nbytes, kind, self.stream)

    def synchronize(self) -> None:
        call(self.cudart, "cudaStreamSynchronize", self.stream)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[Any]]:
        """Record the work queued on the stream in the block into a CUDA graph; the yielded
        list receives the instantiated graph (launch it with ``launch``)."""
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        call(self.cudart, "cudaStreamBeginCapture", self.stream, mode)
        result: list[Any] = []
        try:
            yield result
        finally:
            graph = call(self.cudart, "cudaStreamEndCapture", self.stream)
        self._graphs.append(graph)
        result.append(call(self.cudart, "cudaGraphInstantiate", graph, 0))
        self._graph_execs.append(result[0])

    def launch(self, graph_exec: Any) -> None:
        call(self.cudart, "cudaGraphLaunch", graph_exec, self.stream)

    def close(self) -> None:
        """Free every buffer, graph and the stream (idempotent)."""
        for pointer in self._buffers:
            self.cudart.cudaFree(pointer)
        for graph_exec in self._graph_execs:
            self.cudart.cudaGraphExecDestroy(graph_exec)
        for graph in self._graphs:
            self.cudart.cudaGraphDestroy(graph)
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
        self._buffers, self._graphs, self._graph_execs, self.stream = [], [], [], None
