"""``loc3r-bench --fresh-process``: what a user's run costs, from process start, each side a
new interpreter, timed from outside.

Sides: ``loc3r-run VIDEO QUESTION --max-new-tokens 1 --no-cache`` on each ``--backend``
(exported ones on ``--engines``), and the baseline as a user would run it
(``python -m loc3r.bench.transformers_run``: transformers' llava-onevision + CUT3R), run in
turn A B A B. Per run, from outside the process:

- ``start_to_first_token``: spawn -> the first byte after ``A: `` on its stdout (imports,
  model loading, video, question: everything a user waits for);
- ``cpu_to_first_token``: the process's CPU-seconds (user + system, ``/proc/PID/stat``)
  at that moment; on a shared, loaded machine the figure load cannot decide;
- ``ttft``: the process's own ``first token after X s`` line (video given -> first token);
- ``cpu`` and ``wall``: the whole process (``wait4``);
- ``peak_rss``: the process's own high-water mark (``VmHWM`` of ``/proc/PID/status``,
  sampled every 10 ms until it exits): peak memory from process start.

``--cpus 0`` pins every side to those CPUs before it starts (``sched_setaffinity``): torch
sizes its thread pool from the affinity and loc3r sizes ONNX Runtime's from it
(``runtime.ort.confined_threads``), so one CPU is one thread per side.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

from loc3r.errors import InputError

MARKER = b"A: "
TTFT_LINE = re.compile(rb"first token after ([0-9.]+) s")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessRun:
    """One fresh process, seen from outside (seconds, MiB)."""

    start_to_first_token: float
    cpu_to_first_token: float
    ttft: float
    wall: float
    cpu: float
    peak_rss: float


def process_cpu_s(pid: int) -> float:
    """User + system CPU-seconds of a running process, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15)


def peak_rss_mib(pid: int) -> float | None:
    """``VmHWM`` of a running process in MiB, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_process(argv: Sequence[str], env: dict[str, str] | None = None, timeout_s: float = 3600.0, cpus: frozenset[int] | None = None) -> ProcessRun:
    """Run ``argv`` once and measure it (see the module docstring), pinned to ``cpus`` when
    given; a failed run is an error carrying its last stderr lines."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=stderr, env=env, preexec_fn=pin)
        seen: dict[str, float] = {}
        output = bytearray()

        def read() -> None:  # the first token's arrival, as the bytes come
            while chunk := os.read(process.stdout.fileno(), 65536):
                output.extend(chunk)
                at = output.find(MARKER)
                if "first" not in seen and at >= 0 and len(output) > at + len(MARKER):
                    seen["first"] = time.perf_counter() - start
                    seen["cpu"] = process_cpu_s(process.pid)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        peak, usage = 0.0, None
        while usage is None:  # wait4, not poll: it reaps the process with its resource usage
            peak = max(peak, peak_rss_mib(process.pid) or 0.0)
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode, usage = os.waitstatus_to_exitcode(status), rusage
            elif time.perf_counter() - start > timeout_s:
                process.kill()
            else:
                time.sleep(0.01)
        wall = time.perf_counter() - start
        reader.join()
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace").strip().splitlines()[-3:]
    ttft = TTFT_LINE.search(bytes(output))
    if process.returncode != 0 or "first" not in seen or ttft is None:
        raise InputError(f"{' '.join(argv[:3])} ... failed (exit {process.returncode}): {' | '.join(tail)}", "run it by hand to see why")
    return ProcessRun(seen["first"], seen["cpu"], float(ttft.group(1)), wall, usage.ru_utime + usage.ru_stime, peak)


def median_run(runs: Sequence[ProcessRun]) -> dict[str, float]:
    """The median of each figure."""
    return {name: median(getattr(r, name) for r in runs) for name in ProcessRun.__dataclass_fields__}


def loc3r_run(video: Path, question: str, model: str, frames: int, backend: str, engines: Path | None) -> list[str]:
    """The ``loc3r-run`` command of one side (the console script beside this interpreter)."""
    command = [str(Path(sys.executable).with_name("loc3r-run")), str(video), question, "--model", model, "--frames", str(frames)]
    command += ["--backend", backend, "--max-new-tokens", "1", "--no-cache"]
    return command + (["--engines", str(engines)] if engines else [])


def transformers_run(video: Path, question: str, model: str, frames: int) -> list[str]:
    """The baseline's command: transformers + CUT3R as one script."""
    return [sys.executable, "-m", "loc3r.bench.transformers_run", str(video), question, "--model", model, "--frames", str(frames)]


# every side's environment (unless the caller's sets it): the baseline's best setting on a
# shared machine, where torch's OpenMP threads would otherwise spin-wait between regions
FAIR_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def run_fresh(sides: dict[str, list[str]], repeat: int, warmup: int, log: Any = None, cpus: frozenset[int] | None = None) -> dict[str, Any]:
    """Each side ``warmup + repeat`` times, in turn (A B A B, the order reversed every other
    round so that drifting load hits all sides alike), in one environment with
    ``FAIR_ENVIRONMENT``, pinned to ``cpus`` when given; every run, the medians, the ratios of
    the first side (the baseline) to each other side, and the load average before and after."""
    environment = {key: os.environ.get(key, value) for key, value in FAIR_ENVIRONMENT.items()}
    env = {**os.environ, **environment}
    load_before = list(os.getloadavg())
    runs: dict[str, list[ProcessRun]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(warmup + repeat):
        for name in names if i % 2 == 0 else names[::-1]:
            if log:
                log(f"{'warm-up' if i < warmup else 'run'} {i + 1}: {name}")
            run = run_process(sides[name], env, cpus=cpus)
            if i >= warmup:
                runs[name].append(run)
    medians = {name: median_run(values) for name, values in runs.items()}
    baseline = names[0]
    return {
        "commands": {name: " ".join(command) for name, command in sides.items()},
        "environment": environment,
        "runs": {name: [asdict(r) for r in values] for name, values in runs.items()},
        "medians": medians,
        "ratios": {
            name: {k: medians[baseline][k] / medians[name][k] for k in medians[name] if medians[name][k] > 0}
            for name in names[1:]
        },
        "ratio_definition": f"{baseline} median / this side's median (> 1: this side is faster, or smaller for peak_rss)",
        "cpus": sorted(cpus) if cpus else None,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
    }


def pinned(cpus: Sequence[int] | None) -> str:
    """How the sides' processes were placed, in words."""
    if not cpus:
        return "each side on every CPU (default threads)"
    return f"each side pinned to CPU {', '.join(map(str, cpus))} ({len(cpus)} thread(s) per side)"


def render_fresh(doc: dict[str, Any]) -> str:
    """The markdown report of ``run_fresh``'s document (with ``machine``/``command`` added)."""
    fresh = doc["fresh_process"]
    names = list(fresh["medians"])
    rows = [
        ("start_to_first_token", "process start -> first token, wall", "s"),
        ("cpu_to_first_token", "process start -> first token, CPU-seconds", "s"),
        ("ttft", "cold TTFT (video given -> first token), wall", "s"),
        ("cpu", "whole process, CPU-seconds", "s"),
        ("wall", "whole process, wall", "s"),
        ("peak_rss", "peak RSS from process start (VmHWM)", "MiB"),
    ]
    from loc3r.bench.provenance import header

    lines = [
        f"# loc3r-bench --fresh-process: {doc['model']}, {doc['frames']} frames",
        "",
        *header(doc["provenance"]),
        f"{doc['repeat']} runs per side after {doc['warmup']} warm-up, in turn (A B A B); {pinned(fresh.get('cpus'))}; "
        "every side's environment: " + ", ".join(f"`{k}={v}`" for k, v in fresh["environment"].items())
        + " (the baseline's best setting on a shared machine: torch's OpenMP threads otherwise spin-wait and inflate its "
        "CPU-seconds). A shared machine: CPU-seconds are the figure load cannot decide.",
        "",
        "**The weights are RANDOM: these are timings of the architecture, not of a trained model.**",
        "",
        "| figure | " + " | ".join(names) + " | " + " | ".join(f"{names[0]} / {n}" for n in names[1:]) + " |",
        "|---" * (1 + 2 * len(names) - 1) + "|",
    ]
    for key, label, unit in rows:
        cells = [f"{fresh['medians'][n][key]:.{0 if unit == 'MiB' else 2}f} {unit}" for n in names]
        ratios = [f"{fresh['ratios'][n].get(key, float('nan')):.2f}x" for n in names[1:]]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", "Commands (each run as a fresh process):", ""]
    lines += [f"- {name}: `{command}`" for name, command in fresh["commands"].items()]
    if doc.get("exports"):
        lines += ["", "Exports:", ""] + [f"- {name}: {form}" for name, form in doc["exports"].items()]
    lines += ["", f"MODEL_DIR: the {doc['model']} bundle; VIDEO: the benchmark's video. Medians of the runs; every run is in the JSON."]
    lines += ["", " ".join(__doc__.split("\n\n", 1)[1].split())]
    return "\n".join(lines) + "\n"
