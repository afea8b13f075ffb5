"""Which ONNX Runtime session options suit a one-shot ``loc3r-run``: each variant as a fresh
process, measured from outside (``loc3r.bench.fresh``), in turn.

``python -m loc3r.bench.ort_options --engines DIR --video V [--model M] [--frames N] [--repeat R]``

Variants (each changes what ``loc3r.runtime.ort.session_options`` returns, in the child):
``runtime`` (what loc3r ships: no spinning, the arena on for the per-frame graphs and off
for the LLM), ``arena on`` (every session), ``arena off`` (every session), ``spinning``
(per-session pools that spin, arena off), ``per-session pools`` (no spinning, arena off) and
``ORT defaults`` (arena on, per-session spinning pools).
The child is ``python -m loc3r.bench.ort_options child VARIANT -- LOC3R-RUN ARGS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VARIANTS = ("runtime", "arena on", "arena off", "spinning", "per-session pools", "ORT defaults")


def variant_options(variant: str) -> Any:
    """A ``session_options`` replacement for ``variant``."""
    import loc3r.runtime.ort as ort_module

    shipped = ort_module.session_options

    def options(threads: int | None = None, arena: bool = False) -> Any:
        if variant == "runtime":
            return shipped(threads, arena)
        if variant in ("arena on", "arena off"):
            return shipped(threads, arena=variant == "arena on")
        made = ort_module.import_onnxruntime().SessionOptions()  # per-session pools from here on
        made.intra_op_num_threads = threads or (0 if variant == "ORT defaults" else cpu_count())  # 0: ORT picks
        if variant != "ORT defaults":
            made.enable_cpu_mem_arena = False
        if variant == "per-session pools":
            made.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return made

    return options


def cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def child(variant: str, argv: Sequence[str]) -> int:
    import loc3r.runtime.ort as ort_module

    ort_module.session_options = variant_options(variant)
    from loc3r.runtime.cli import main

    return main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        return child(argv[1], argv[argv.index("--") + 1 :])
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.ort_options", description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True, type=Path)
    parser.add_argument("--video", required=True, type=Path)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from loc3r.bench.fresh import loc3r_run, run_fresh
    from loc3r.bench.presets import resolve_bench_model
    from loc3r.bench.report import code_provenance
    from loc3r.fileio import write_json_atomic

    model = str(resolve_bench_model(args.model))
    run_args = loc3r_run(args.video, "Where am I standing?", model, args.frames, "onnxruntime", args.engines)[1:]
    sides = {v: [sys.executable, "-m", "loc3r.bench.ort_options", "child", v, "--", *run_args] for v in args.variants}
    doc = run_fresh(sides, args.repeat, warmup=0, log=lambda line: print(line, file=sys.stderr))
    doc |= {"command": "python -m loc3r.bench.ort_options " + " ".join(argv), **code_provenance()}
    if args.json:
        write_json_atomic(args.json, doc)
    print(f"{'variant':<20} {'CPU-s to 1st tok':>16} {'wall to 1st tok':>16} {'peak RSS MiB':>13} {'CPU-s total':>12}")
    for name, m in doc["medians"].items():
        print(f"{name:<20} {m['cpu_to_first_token']:>16.2f} {m['start_to_first_token']:>16.2f} {m['peak_rss']:>13.0f} {m['cpu']:>12.2f}")
    print(f"load average before {doc['load_average_before']}, after {doc['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
