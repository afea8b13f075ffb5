"""The benchmark's outputs: the JSON document, its markdown table and a bar chart."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from loc3r.bench.measure import STAGES
from loc3r.bench.memory import gpu_info
from loc3r.fileio import atomic_file

# The folders whose code a benchmark runs (the package's, mapped in pyproject.toml).
CODE_FOLDERS = ("loc3r", "models", "runtime", "export", "benchmarks", "engines", "pyproject.toml")
RESULTS_FOLDER = "benchmarks/results"  # what benchmarks write: not code
VERSION_PACKAGES = ("loc3r", "torch", "transformers", "onnxruntime", "numpy", "av", "tokenizers")
RANDOM_WEIGHTS_NOTE = "The weights are RANDOM: these are timings of the architecture, not of a trained model."


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, GPU (if any), package versions and the git commit."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": _torch_threads(),
        "ram_gib": _meminfo_gib("MemTotal"),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu_info(),
        "versions": {name: _version(name) for name in VERSION_PACKAGES},
        **code_provenance(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_gib(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(field + ":"):
                return round(float(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def code_provenance() -> dict[str, Any]:
    """Which code ran: HEAD (``git_commit``), the last commit that changed the package's
    folders (``code_commit``) and whether they hold uncommitted changes (``code_dirty``,
    with ``dirty_files``); None values outside a git checkout (an installed wheel)."""
    root = _git("rev-parse", "--show-toplevel")
    if root is None:
        return {"git_commit": None, "code_commit": None, "code_dirty": None, "dirty_files": []}
    top = Path(root.strip())
    paths = [str(top / f) for f in CODE_FOLDERS if (top / f).exists()] + [f":(exclude){top / RESULTS_FOLDER}"]
    dirty = (_git("status", "--porcelain", "--untracked-files=all", "--", *paths) or "").splitlines()
    return {
        "git_commit": (_git("rev-parse", "HEAD") or "").strip() or None,
        "code_commit": (_git("log", "-1", "--format=%H", "--", *paths) or "").strip() or None,
        "code_dirty": bool(dirty),
        "dirty_files": [line[3:] for line in dirty],
    }


def _git(*args: str) -> str | None:
    """stdout of ``git args`` run beside this file, or None when git or the checkout is missing."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


# -- markdown ------------------------------------------------------------------------------


def render_markdown(doc: Mapping[str, Any]) -> str:
    """Header (command, machine, model, what each column runs), stage table with ratios
    against each baseline, memory, floor."""
    m, model = doc["machine"], doc["model"]
    columns = {**doc["baselines"], **doc["optimized"]}
    backends, bases = list(doc["optimized"]), list(doc["baselines"])
    ratio_columns = [(base, b) for b in backends for base in bases]
    from loc3r.bench.provenance import header

    lines = [
        f"# loc3r-bench: {model['model_id']}, {doc['frames']} frames",
        "",
        *header(doc["provenance"]),
        f"Torch threads {m['torch_threads']}, {m['os']}; GPU: {m['gpu']['name'] if m['gpu'] else 'none'}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + "  ",
        f"Repeats: {doc['repeat']} after {doc['warmup']} warm-up; seconds as median (min-max).",
        "",
        f"**{RANDOM_WEIGHTS_NOTE}**" if model["random_weights"] else "",
        "",
        "Columns and the LLM each runs: " + "; ".join(f"**{c['label']}**: {c['llm_format']}" for c in columns.values()) + ".",
        "",
        "| stage | " + " | ".join(c["label"] for c in columns.values()) + " | "
        + " | ".join(f"{doc['optimized'][b]['label']} vs {doc['baselines'][base]['label']}" for base, b in ratio_columns) + " |",
        "|---|" + "---|" * (len(columns) + len(ratio_columns)),
    ]
    for stage in STAGES:
        cells = [_cell(c["stages"][stage]) for c in columns.values()]
        cells += [_ratio(doc["ratios"][base][b].get(stage)) for base, b in ratio_columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    rates = [f"{c['decode_tokens_per_s']:.1f}" for c in columns.values()]
    lines.append("| decode tok/s | " + " | ".join(rates) + " |" + " |" * len(ratio_columns))
    lines += ["", "Ratio = baseline median / ours (> 1: ours is faster). Stages: "
              + "; ".join(f"`{k}` = {v}" for k, v in STAGES.items()) + ".", ""]
    lines += ["## Peak host memory (RSS, MiB, per phase)", "", "| phase | RSS at start | peak | growth |", "|---|---|---|---|"]
    for phase, entry in doc["memory"]["phases"].items():
        lines.append(f"| {phase} | {entry['start_rss_mib']:.0f} | {entry['peak_rss_mib']:.0f} | {entry['growth_mib']:.0f} |")
    lines += [
        "",
        f"Process peak (VmHWM): {doc['memory']['process_peak_rss_mib']:.0f} MiB. The baselines hold every decoded frame "
        f"({doc['frames_in_memory_mib']:.1f} MiB of RGB) before encoding. Phases run in one process, so a "
        "later phase's start includes what earlier ones left allocated; `growth` is peak - start.",
        "",
        "## Baselines",
        "",
        doc["baseline_method"],
    ]
    if doc.get("floor"):
        lines += ["", *_floor_lines(doc)]
    return "\n".join(lines) + "\n"


def _cell(summary: Mapping[str, float]) -> str:
    return f"{_fmt(summary['median'])} ({_fmt(summary['min'])}-{_fmt(summary['max'])})"


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.1 else f"{seconds:.3f} s"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _floor_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Roofline floor of this model on the chosen targets (`loc3r.bench.floor`)",
        "",
        "| target | TTFT cold floor | TTFT cached floor | decode tok/s floor |",
        "|---|---|---|---|",
    ]
    for report in doc["floor"]:
        lines.append(
            f"| {report['target']} | {_fmt(report['ttft_cold_s'])} | {_fmt(report['ttft_cached_s'])} | {report['decode_tok_s']:.0f} |"
        )
    lines += ["", "Floors are for the benchmarked model's sizes on the target's hardware profile, not on this machine: "
              "a time measured here is not divided by them (a 2-core VM against a 16-core desktop profile)."]
    return lines


# -- plot ----------------------------------------------------------------------------------


def write_plot(doc: Mapping[str, Any], path: str | Path, size_px: tuple[int, int] = (1200, 600)) -> Path:
    """Bar chart of stage medians (log seconds): the baselines and each optimized backend; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = [s for s in STAGES if s != "encode_3d_per_frame"]
    series = [(c["label"], c["stages"]) for c in (*doc["baselines"].values(), *doc["optimized"].values())]
    dpi = 100
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    x = np.arange(len(stages))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        medians = [max(values[s]["median"], 1e-7) for s in stages]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, medians, width, label=label)
    ax.set_yscale("log")
    first_base = next(iter(doc["ratios"]))
    first = next(iter(doc["ratios"][first_base].values()), {})
    for xi, stage in zip(x, stages):  # first baseline / first optimized backend above each group
        top = max(values[stage]["median"] for _, values in series)
        if first.get(stage) is not None:
            ax.annotate(f"{first[stage]:.2g}x", (xi, top), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, stages, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds (median, log scale)")
    ax.set_xlabel(f"stage (label: {doc['baselines'][first_base]['label']} / {next(iter(doc['optimized']), '')} ratio)", fontsize=8)
    model = doc["model"]
    note = " - RANDOM weights" if model["random_weights"] else ""
    ax.set_title(f"loc3r-bench: {model['model_id']}, {doc['frames']} frames{note}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="major", alpha=0.3)
    fig.subplots_adjust(bottom=0.18, left=0.08, right=0.98, top=0.92)
    path = Path(path)
    with atomic_file(path, "wb") as stream:
        fig.savefig(stream, format="png", dpi=dpi)
    plt.close(fig)
    return path
