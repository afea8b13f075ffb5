"""Memory readings: host RSS (a background sampler, per phase) and, on a GPU, device memory.

RSS is read from ``/proc/self/status`` (Linux); elsewhere ``resource.getrusage`` gives the
process peak only. Device memory comes from ``torch.cuda`` and, if importable, NVML
(``pynvml``); both are skipped cleanly without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
MIB = 1024.0 * 1024.0


def _status_kib(field: str) -> float | None:
    try:
        for line in STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mib() -> float:
    """Resident set size of this process now, MiB (the peak so far where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib / 1024.0 if kib is not None else peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (VmHWM), MiB."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / MIB if sys.platform == "darwin" else rss / 1024.0


# Appended to a child's code: it prints its own high-water RSS on exit. ``ru_maxrss`` read
# in a child would include the parent's RSS at fork time; VmHWM is the child's own.
REPORT_HWM = "\nprint(next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')))"


def child_peak_rss(code: str, args: Sequence[str] = ()) -> tuple[int, float]:
    """Peak RSS (bytes, the child's VmHWM) and wall time of ``python -c code args``."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + REPORT_HWM, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{code[:40]}... failed ({done.returncode}): {done.stderr.strip()}")
    kib = int(done.stdout.strip().splitlines()[-1].split()[1])
    return kib * 1024, time.perf_counter() - start


def own_peak_rss_bytes(pid: int) -> int | None:
    """``VmHWM`` of process ``pid`` (its own high-water RSS), bytes; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None  # a zombie: its memory is already released


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` now (children of every thread, recursively)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in (task / "children").read_text(encoding="ascii").split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


class DescendantPeaks:
    """Samples, every ``interval_s`` in a daemon thread, the own ``VmHWM`` of every process
    below ``pid`` (by default this one), by pid. ``ru_maxrss`` of ``RUSAGE_CHILDREN`` is no
    substitute: a child's starts from its parent's peak at ``exec``, so a small subprocess
    of a large parent is reported as large. Each process keeps its LAST reading: between
    fork and exec a child still shows its parent's memory, and ``exec`` starts a new
    high-water mark, which only grows from there. A process living less than one interval
    may be missed."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.02) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="descendant-peaks", daemon=True)

    def __enter__(self) -> DescendantPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            for pid in descendants(self.pid):
                peak = own_peak_rss_bytes(pid)
                if peak is not None:
                    self.peaks[pid] = peak
            if self._stop.wait(self.interval_s):
                return

    @property
    def largest_bytes(self) -> int:
        """The largest own peak RSS of any process seen below ``pid`` (0 when none ran)."""
        return max(self.peaks.values(), default=0)


class RssSampler:
    """Samples RSS every ``interval_s`` in a daemon thread; ``phase(name)`` records, for the
    code inside it, the RSS at entry and the peak reached (both MiB)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.phases: dict[str, dict[str, float]] = {}
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._observe(current_rss_mib())

    def _observe(self, rss: float) -> None:
        with self._lock:
            self._peak = max(self._peak, rss)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record ``name``'s start RSS and peak RSS (max over samples and both ends)."""
        start = current_rss_mib()
        with self._lock:
            self._peak = start
        device = DeviceMemory()
        try:
            yield
        finally:
            self._observe(current_rss_mib())
            with self._lock:
                peak = self._peak
            entry = self.phases.setdefault(name, {"start_rss_mib": start, "peak_rss_mib": peak})
            entry["peak_rss_mib"] = max(entry["peak_rss_mib"], peak)
            entry["growth_mib"] = entry["peak_rss_mib"] - entry["start_rss_mib"]
            gpu = device.read()
            if gpu is not None:
                entry.update(gpu)


class DeviceMemory:
    """Peak CUDA memory of one phase (torch allocator, NVML used memory); None without a GPU."""

    def __init__(self) -> None:
        self.cuda = _cuda_available()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, float] | None:
        if not self.cuda:
            return None
        import torch

        out = {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / MIB}
        nvml = nvml_used_mib()
        if nvml is not None:
            out["nvml_used_mib"] = nvml
        return out


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def nvml_used_mib() -> float | None:
    """Device 0's used memory from NVML, MiB; None when ``pynvml`` or the driver is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return pynvml.nvmlDeviceGetMemoryInfo(handle).used / MIB
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


def gpu_info() -> dict[str, Any] | None:
    """Name and total memory of CUDA device 0, or None."""
    if not _cuda_available():
        return None
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "total_mib": props.total_memory / MIB}
