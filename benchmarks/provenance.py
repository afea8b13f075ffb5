"""One provenance record for every result file in ``benchmarks/results``.

A benchmark opens a :class:`Recording` before it measures and closes it after; the record
holds the commit (refused when it is not reachable from ``main`` or the code is dirty,
unless the caller allows it: the record then says so), the command, the load average
before AND after, wall and CPU seconds of the whole run (this process and the children it
waited for), how runs were interleaved, the repeats, and the machine (CPU model, cores,
SIMD flags). ``MEASURES`` names the code each result measures: a result whose commit is
older than the last change to that code is stale, and its ``.md`` must say so at its top
(``python -m loc3r.bench.provenance`` lists them; ``--mark-stale`` adds the note).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loc3r.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MAIN = "main"
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
STALE_MARK = "**Stale:**"
_RUNTIME = ("runtime/pipeline.py", "runtime/session.py", "runtime/stages.py", "runtime/torch_backend.py", "models/llm.py")

# result file stem -> the code it measures (paths relative to the repository root): the
# runtime, export and model code, and a baseline that is itself measured; not the scripts
# that drive and report a benchmark (a change there that alters a figure re-records it)
MEASURES: dict[str, tuple[str, ...]] = {
    "bench_small": (*_RUNTIME, "runtime/ort.py", "runtime/onnx_backend.py", "runtime/onnx_llm.py", "runtime/video.py", "models/cut3r",
                    "models/vision.py", "benchmarks/baseline.py"),
    "fresh_small": (*_RUNTIME, "runtime/cli.py", "runtime/ort.py", "runtime/onnx_backend.py", "runtime/onnx_llm.py", "runtime/video.py",
                    "models/cut3r", "models/vision.py", "benchmarks/transformers_run.py"),
    "fresh_small_2cpu": (*_RUNTIME, "runtime/cli.py", "runtime/ort.py", "runtime/onnx_backend.py", "runtime/onnx_llm.py",
                         "runtime/video.py", "models/cut3r", "models/vision.py", "benchmarks/transformers_run.py"),
    "decode": ("runtime/video.py", "runtime/keyframe_reader.py", "runtime/frame_index.py"),
    "encoders_3d": ("models/cut3r", "models/vggt", "models/encoder3d.py"),
    "streaming_small": (*_RUNTIME, "runtime/video.py", "runtime/prefetch.py", "runtime/encoding_cache.py"),
    "llm_quant": ("export/llm.py", "export/llm_build.py", "runtime/onnx_llm.py"),
    "llm_quant_speed": ("export/llm.py", "export/llm_build.py", "runtime/onnx_llm.py"),
    "llm_runtime_small": ("models/llm.py", "runtime/onnx_llm.py", "export/llm.py"),
    "llm_runtime_tiny": ("models/llm.py", "runtime/onnx_llm.py", "export/llm.py"),
    "llm_export_memory": ("export/llm.py", "export/llm_build.py"),
    "real_size": ("export", "models", "runtime", "benchmarks/real_size.py", "benchmarks/child.py", "benchmarks/fabricate.py"),
    "serve_load_tiny": ("serve", *_RUNTIME),
    "convert_memory": ("models/convert_llava.py", "models/convert_bundle.py", "models/convert_stream.py"),
    "cut3r_step": ("export/onnx_export.py", "export/exporter.py", "export/int8.py", "runtime/ort.py", "runtime/onnx_backend.py",
                   "models/cut3r"),
    "floor": ("benchmarks/floor.py", "benchmarks/flops.py", "engines"),
    "scenes_small": (*_RUNTIME, "runtime/scene_store.py", "runtime/encoding_cache.py", "benchmarks/scenes.py"),
    "scenes_serve_small": ("serve/sessions.py", "serve/worker.py", *_RUNTIME, "runtime/scene_store.py", "benchmarks/scenes_serve.py"),
}


def git(*args: str) -> str | None:
    """stdout of ``git args`` in the repository, or None when git or the checkout is missing."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip("\n") if done.returncode == 0 else None


def reachable_from_main(commit: str) -> bool:
    """``commit`` is ``main`` or one of its ancestors."""
    try:
        done = subprocess.run(["git", "merge-base", "--is-ancestor", commit, MAIN], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def dirty_files() -> list[str]:
    """Uncommitted changes to the code (results excluded)."""
    out = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results") or ""
    return [line[3:] for line in out.splitlines() if line.strip()]


def cpu_flags() -> list[str]:
    """The SIMD flags of ``SIMD_FLAGS`` that /proc/cpuinfo lists."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in SIMD_FLAGS if flag in present]
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    """CPU model, cores, the CPUs this process may run on (``taskset``), SIMD flags, RAM."""
    model = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")), None)
    ram = next((int(line.split()[1]) / 2**20 for line in _lines("/proc/meminfo") if line.startswith("MemTotal:")), None)
    return {"cpu": model, "cores": os.cpu_count(), "cpus_allowed": sorted(os.sched_getaffinity(0)), "simd": cpu_flags(),
            "ram_gib": None if ram is None else round(ram, 2)}


def placement(machine_record: dict[str, Any]) -> str:
    """" (this run confined to CPU 1)" when the run was restricted to some of the machine's
    CPUs, else "" (how many threads each pool had is the benchmark's own statement)."""
    allowed = machine_record.get("cpus_allowed")
    if not allowed or len(allowed) >= (machine_record.get("cores") or 0):
        return ""
    return f" (this run confined to CPU {','.join(map(str, allowed))})"


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@dataclass
class Recording:
    """Provenance of one result: open before measuring, :meth:`finish` after."""

    result: str  # the result file's stem: a key of MEASURES for a file in benchmarks/results
    argv: Sequence[str]
    interleaving: str  # e.g. "A B A B (baseline first on even repeats)"
    repeats: int
    allow_unreachable: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        commit = git("rev-parse", "HEAD")
        dirty = dirty_files()
        reachable = commit is not None and reachable_from_main(commit)
        if not self.allow_unreachable and (not reachable or dirty):
            why = "has uncommitted changes in " + ", ".join(dirty[:5]) if dirty else f"commit {commit} is not on {MAIN}"
            raise InputError(f"the code to measure {why}: a result must name a commit reachable from {MAIN}",
                             "commit and land first, or pass --allow-unreachable (the result then says so)")
        self.record = {
            "result": self.result,
            "commit": commit,
            "reachable_from_main": reachable,
            "dirty_files": dirty,
            "measures": list(MEASURES.get(self.result, ())),
            "command": shlex.join(self.argv),
            "interleaving": self.interleaving,
            "repeats": self.repeats,
            "machine": machine(),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_before": [round(v, 2) for v in os.getloadavg()],
        }
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()

    def finish(self) -> dict[str, Any]:
        """The record, with load after, wall and CPU seconds of the run."""
        self.record |= {
            "load_after": [round(v, 2) for v in os.getloadavg()],
            "wall_s": round(time.perf_counter() - self._wall, 2),
            "cpu_s": round(_cpu_seconds() - self._cpu, 2),
        }
        return self.record


def outside_results(*paths: str | Path) -> bool:
    """None of ``paths`` is in ``benchmarks/results``: a user's or a test's run, whose record
    may name code that is not on main (it says so) instead of being refused."""
    return all(Path(path).resolve().parent != RESULTS.resolve() for path in paths)


def start(result: str, argv: Sequence[str], interleaving: str, repeats: int, allow_unreachable: bool = False) -> Recording:
    """A :class:`Recording`, or one line naming the problem and its fix (exit 2), no traceback."""
    try:
        return Recording(result, argv, interleaving, repeats, allow_unreachable)
    except InputError as exc:
        print(f"{argv[2] if len(argv) > 2 else result}: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


def header(record: dict[str, Any]) -> list[str]:
    """Markdown lines that state a record (for the top of a result's ``.md``)."""
    m = record["machine"]
    state = "" if record["reachable_from_main"] and not record["dirty_files"] else (
        " (**NOT reachable from main or with uncommitted changes: " + ", ".join(record["dirty_files"]) + "**)")
    return [
        f"Command: `{record['command']}`  ",
        f"Commit: {record['commit']}{state}; {record['date_utc']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores{placement(m)}, {m['ram_gib']} GiB, SIMD {' '.join(m['simd'])}; shared with other "
        f"engineers' work: load average (1, 5, 15 min) before {record['load_before']}, after {record['load_after']}  ",
        f"Run: {record['wall_s']} s wall, {record['cpu_s']} CPU-s (this process and its children); "
        f"{record['repeats']} repeats, {record['interleaving']}",
    ]


# -- staleness -----------------------------------------------------------------------------


def recorded_commit(doc: dict[str, Any]) -> str | None:
    """The commit a result names: its provenance record's, else an older file's machine section."""
    if isinstance(doc.get("provenance"), dict):
        return doc["provenance"].get("commit")
    machine_section = doc.get("machine") if isinstance(doc.get("machine"), dict) else {}
    return machine_section.get("git_commit") or machine_section.get("commit") or doc.get("commit")


def staleness(stem: str, checkout: str = "HEAD") -> str | None:
    """Why ``results/<stem>.json`` is stale in ``checkout`` (None when it is current): no commit
    recorded, a commit not in the repository or not in the checkout's history, or code it
    measures changed since. The checkout, not the ``main`` ref: a clean checkout of main is
    both, and a branch or an older commit is judged by its own code."""
    path = RESULTS / f"{stem}.json"
    if not path.is_file():
        return None
    commit = recorded_commit(json.loads(path.read_text(encoding="utf-8")))
    if not commit:
        return "it records no commit"
    if git("cat-file", "-e", f"{commit}^{{commit}}") is None:
        return f"its commit {commit[:10]} is not in the repository"
    if git("merge-base", "--is-ancestor", commit, checkout) is None:
        return f"its commit {commit[:10]} is not in this checkout's history"
    last = git("log", "-1", "--format=%H", checkout, "--", *MEASURES[stem])
    if last and git("merge-base", "--is-ancestor", last, commit) is None:
        return f"measured at {commit[:10]}; the code it measures changed since ({last[:10]}: {', '.join(MEASURES[stem])})"
    return None


def says_stale(stem: str, lines: int = 6) -> bool:
    """The ``.md``'s first ``lines`` lines carry the stale note."""
    md = RESULTS / f"{stem}.md"
    return md.is_file() and STALE_MARK in "\n".join(md.read_text(encoding="utf-8").splitlines()[:lines])


def without_stale_note(text: str) -> str:
    """A result's ``.md`` as its renderer wrote it: the stale note ``mark_stale`` added removed."""
    lines = text.splitlines()
    for at, line in enumerate(lines):
        if line.startswith(STALE_MARK):
            del lines[at - 1 if at and not lines[at - 1] else at : at + 1]
            break
    return "\n".join(lines) + "\n"


def mark_stale(stem: str, why: str) -> None:
    """Put the stale note under the ``.md``'s title (replacing an earlier one)."""
    from loc3r.fileio import atomic_file

    md = RESULTS / f"{stem}.md"
    lines = [line for line in md.read_text(encoding="utf-8").splitlines() if not line.startswith(STALE_MARK)]
    at = 1 if lines and lines[0].startswith("#") else 0
    note = f"{STALE_MARK} {why}. Its figures describe older code: re-measure before quoting them."
    lines[at:at] = ["", note] if at else [note, ""]
    with atomic_file(md, "w") as stream:
        stream.write("\n".join(lines).replace("\n\n\n", "\n\n") + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.provenance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mark-stale", action="store_true", help="add the stale note to each stale result's .md")
    parser.add_argument("--header", metavar="JSON", help="print the markdown header of a result's provenance record "
                        "(for a .md written by hand from a benchmark's JSON) and exit")
    args = parser.parse_args(argv)
    if args.header:
        try:
            lines = header(json.loads(Path(args.header).read_text(encoding="utf-8"))["provenance"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{parser.prog}: error: {args.header} holds no complete provenance record (missing {exc}); re-run its benchmark",
                  file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 0
    missing = 0
    for stem in MEASURES:
        why = staleness(stem)
        if why is None:
            continue
        if args.mark_stale and not says_stale(stem):
            mark_stale(stem, why)
        state = "noted" if says_stale(stem) else "NOT NOTED"
        missing += state != "noted"
        print(f"{stem}: stale ({state}): {why}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
