"""Run one ``main(argv)`` in this process and report what it cost, as a benchmark phase.

``python -m loc3r.bench.child REPORT.json package.module:function [ARGS...]`` calls
``function(ARGS)`` and writes to REPORT.json, even when it fails: the exit code, wall
seconds, peak RSS (``VmHWM``: this process's own high-water mark, which a fresh
interpreter's ``ru_maxrss`` seen from the parent may not be), the largest own peak RSS of
the subprocesses it ran (each one's ``VmHWM``, sampled by pid while it runs:
:class:`loc3r.bench.memory.DescendantPeaks`; e.g. the LLM builder) and the bytes this
process caused to be written to storage (``write_bytes`` of /proc/self/io).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from loc3r.bench.memory import DescendantPeaks


def proc_field(path: str, field: str) -> int | None:
    """An integer field of a /proc/self file (``VmHWM`` in kB is returned in bytes)."""
    try:
        for line in Path(path).read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(":")
            if name == field:
                number, *unit = value.split()
                return int(number) * (1024 if unit == ["kB"] else 1)
    except OSError:
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    report, target, rest = Path(args[0]), args[1], args[2:]
    module, _, name = target.partition(":")
    start = time.perf_counter()
    code = 1
    subprocesses = DescendantPeaks()
    try:
        with subprocesses:
            result = getattr(importlib.import_module(module), name)(rest)
        code = int(result or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        report.write_text(json.dumps({
            "exit": code,
            "wall_s": time.perf_counter() - start,
            "peak_rss_bytes": proc_field("/proc/self/status", "VmHWM"),
            "peak_rss_subprocess_bytes": subprocesses.largest_bytes,
            "write_bytes": proc_field("/proc/self/io", "write_bytes"),
        }), encoding="utf-8")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
