"""Dress rehearsal at the real model's size: fabricate, convert, export, run, and measure each phase.

``python -m loc3r.bench.real_size [--llm-layers N] [--workdir DIR] [--out benchmarks/results]``

With random weights in the published layouts (see ``loc3r.bench.fabricate``):

1. ``write_llava``: LLaVA-Video-7B-Qwen2 in the LLaVA-NeXT layout (its config.json, Qwen2's
   slow tokenizer files with a 151643-token BPE, bf16 safetensors shards of at most 5 GB);
   ``--llm-layers`` keeps only the first N of Qwen2-7B's 28 layers (every width is real);
2. ``write_cut3r``: CUT3R 512 DPT's ``.pth`` (camera path at full size);
3. ``convert``: ``loc3r-convert``;
4. ``export_jetson`` / ``export_cpu``: ``loc3r-export --target jetson-orin`` and
   ``--target cpu`` (LLM ``--cpu-llm``, int4 by default: a float32 7B decoder does not fit
   in 24 GiB to run it);
5. ``run_onnxruntime`` / ``run_torch``: ``loc3r-run`` on a 4-frame video with both backends.

Each phase runs in its own process (``loc3r.bench.child``), which reports its wall time,
peak RSS (``VmHWM``, and the largest own ``VmHWM`` of its subprocesses: the LLM builder) and bytes
written; every process must stay under ``--rss-limit-gib``. Every exported file is compared
with the size the exporter's memory plan predicts for it from the bundle's config
(``loc3r.export.memory_plan.predicted_weights``). Results: ``real_size.md`` + ``.json``.
``--resume DIR`` keeps the work in DIR and skips the phases that already completed there,
so a full-size run stopped late is not started again from the checkpoints.
``--preset tiny`` runs the same phases on tiny widths in seconds (the script's own test).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loc3r.bench.fabricate import (
    LLAVA_VIDEO_7B_QWEN2,
    QWEN2_BPE_TOKENS,
    TowerSizes,
    llava_next_shapes,
    parameter_count,
    write_cut3r_pth,
    write_llava_next,
)
from loc3r.bench.child import proc_field
from loc3r.bench.flops import bits_per_weight
from loc3r.bench.provenance import header, outside_results, start
from loc3r.bench.report import machine_info
from loc3r.fileio import atomic_file
from loc3r.models.convert_stream import read_safetensors_header
from loc3r.models.precision import WeightStats, available_memory_bytes, choose_precision

GIB = 2**30
PREDICTION_TOLERANCE = 0.05
QUESTION = "Where is the chair?"
PROGRESS_FILE = "rehearsal.json"  # the completed phases of a work folder, for --resume
PHASES = ("write_llava", "write_cut3r", "convert", "export_jetson", "export_cpu", "run_onnxruntime", "run_torch")


@dataclass(frozen=True)
class Preset:
    """Sizes of one rehearsal: the LLaVA config, its tower, tokenizer and CUT3R variant."""

    config: dict[str, Any]
    tower: TowerSizes
    tokenizer_size: int
    cut3r: str  # a Cut3rConfig constructor name
    max_shard_bytes: int
    convert_flags: tuple[str, ...] = ()  # what loc3r-convert cannot read from the checkpoint


PRESETS = {
    "real": Preset(LLAVA_VIDEO_7B_QWEN2, TowerSizes(), QWEN2_BPE_TOKENS, "real_512_dpt", 5_000_000_000),
    "tiny": Preset(
        {**LLAVA_VIDEO_7B_QWEN2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1100, "mm_hidden_size": 64,
         "mm_vision_tower": "tiny-siglip-patch14-56"},
        TowerSizes(hidden=64, intermediate=128, stored_layers=2, image_size=56), 1000, "tiny", 2_000_000,
        ("--vision-heads", "2"),
    ),
}


@dataclass
class Phase:
    """One measured phase: its command, cost, and what it wrote."""

    name: str
    command: str
    exit: int = -1
    wall_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_rss_subprocess_bytes: int = 0  # the largest subprocess the phase ran (the LLM builder)
    write_bytes: int = 0
    output_bytes: int = 0
    steps: dict[str, dict[str, float]] = field(default_factory=dict)  # progress line -> seconds, peak RSS
    error: str = ""


# -- phases run inside the child (loc3r.bench.child calls these with their argv) -----------


def write_llava_main(argv: Sequence[str]) -> int:
    """``FOLDER PRESET LAYERS``: the LLaVA-NeXT checkpoint."""
    folder, preset, layers = Path(argv[0]), PRESETS[argv[1]], int(argv[2])
    config = {**preset.config, "num_hidden_layers": layers}
    write_llava_next(folder, config, preset.tower, preset.tokenizer_size, max_shard_bytes=preset.max_shard_bytes)
    return 0


def write_cut3r_main(argv: Sequence[str]) -> int:
    """``PATH PRESET``: the CUT3R ``.pth``."""
    from loc3r.models.cut3r import Cut3rConfig

    write_cut3r_pth(Path(argv[0]), getattr(Cut3rConfig, PRESETS[argv[1]].cut3r)())
    return 0


# -- the parent ----------------------------------------------------------------------------


class StepMonitor:
    """A child's progress lines (stderr lines ending in ``...``) as timed steps, with the
    child's peak RSS during each (``VmRSS`` sampled every ``interval_s``)."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.steps: list[list[Any]] = [["start", time.perf_counter(), 0]]  # label, start, peak RSS bytes
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def mark(self, label: str) -> None:
        with self._lock:
            self.steps.append([label, time.perf_counter(), 0])

    def _sample(self) -> None:
        while not self._done.wait(self.interval_s):
            rss = proc_field(f"/proc/{self.pid}/status", "VmRSS") or 0
            with self._lock:
                self.steps[-1][2] = max(self.steps[-1][2], rss)

    def finish(self) -> dict[str, dict[str, float]]:
        """``{label: {"s": seconds, "peak_rss_gib": GiB}}``."""
        self._done.set()
        self._thread.join()
        end = time.perf_counter()
        ends = [step[1] for step in self.steps[1:]] + [end]
        return {label: {"s": round(stop - begin, 1), "peak_rss_gib": round(peak / GIB, 2)}
                for (label, begin, peak), stop in zip(self.steps, ends)}


def run_phase(name: str, target: str, args: Sequence[str], work: Path, outputs: Sequence[Path]) -> tuple[Phase, str]:
    """Run ``target(args)`` in a child process; returns the phase and the child's stdout."""
    report = work / f".{name}.json"
    command = [sys.executable, "-m", "loc3r.bench.child", str(report), target, *args]
    phase = Phase(name, " ".join([target, *args]))
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monitor = StepMonitor(child.pid)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(child.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    errors: list[str] = []
    for line in child.stderr:  # type: ignore[union-attr]
        line = line.rstrip()
        if line.endswith("..."):
            monitor.mark(line.removesuffix("...").strip())
        elif line:
            errors.append(line)
    child.wait()
    reader.join()
    phase.steps = monitor.finish()
    if report.is_file():
        measured = json.loads(report.read_text(encoding="utf-8"))
        phase.exit, phase.wall_s = measured["exit"], round(measured["wall_s"], 1)
        phase.peak_rss_bytes, phase.write_bytes = measured["peak_rss_bytes"] or 0, measured["write_bytes"] or 0
        phase.peak_rss_subprocess_bytes = measured["peak_rss_subprocess_bytes"]
    else:
        phase.exit, phase.wall_s = child.returncode, round(time.perf_counter() - start, 1)
    if phase.exit != 0:
        phase.error = (errors[-1] if errors else f"exit {phase.exit}")[:300]
    phase.output_bytes = sum(tree_bytes(path) for path in outputs)
    return phase, "".join(stdout)


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# -- predicted artifact sizes --------------------------------------------------------------


def bundle_parameters(bundle: Path) -> dict[str, int]:
    """Parameter count per tensor of a bundle, from its safetensors headers."""
    counts: dict[str, int] = {}
    for path in sorted(bundle.glob("*.safetensors")):
        counts.update({name: math.prod(info.shape) for name, info in read_safetensors_header(path).items()})
    return counts


def predicted_files(bundle: Path, manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes each exported graph (with its external data), FP16 graph and LLM file should take,
    as the exporter's memory plan predicts them from the bundle's config for the manifest's
    target (``loc3r.export.memory_plan.predicted_weights``, the figures it refuses targets
    with): a graph's file holds its float32 weights (``disk``), its FP16 graph what an FP16
    target loads (``loaded``)."""
    from loc3r.engines.targets import load_target
    from loc3r.export.llm import llm_form
    from loc3r.export.memory_plan import predicted_weights
    from loc3r.models.config import Loc3rConfig

    target = load_target(manifest["target"]["name"])
    llm = manifest.get("llm")
    form = llm_form(target, llm["quantization"]["layers"]) if llm else None
    files = {name: entry["file"] for name, entry in manifest["artifacts"].items()}
    if llm:
        files.update({"llm decoder": llm["decoder"]["file"], "llm embedding table": llm["embeddings"]["file"]})
    weights = predicted_weights(Loc3rConfig.load(bundle), target, form)
    predicted = {files[name]: w.disk for name, w in weights.items() if name in files}
    for name, entry in manifest["artifacts"].items():
        if "fp16" in entry and name in weights:
            predicted[entry["fp16"]["file"]] = weights[name].loaded
    return predicted


def artifact_rows(export: Path, bundle: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file of an export (whose manifest is ``manifest``) with its size, and the
    prediction where one applies."""
    predicted = predicted_files(bundle, manifest)
    rows = []
    for path in sorted(p for p in export.rglob("*") if p.is_file() and not p.name.endswith(".data")):
        name = path.relative_to(export).as_posix()
        data = path.with_name(path.name + ".data")
        actual = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
        expected = predicted.get(name)
        ratio = actual / expected if expected else None
        rows.append({"file": name + (" + .data" if data.is_file() else ""), "bytes": actual, "predicted": expected,
                     "ratio": ratio, "within": None if ratio is None else abs(ratio - 1) <= PREDICTION_TOLERANCE})
    return rows


def export_checks(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the exporter checked, from its manifest: each graph's ONNX Runtime parity with
    PyTorch (max |error|, frames or runs) and its FP16 graph's error relative to the output
    scale, and the LLM decoder's probe against the PyTorch LLM."""
    graphs = {
        name: {"max_abs": entry["parity"]["max_abs"], "runs": entry["parity"]["runs"],
               "fp16_relative": entry["fp16"]["error_vs_fp32"]["relative"] if "fp16" in entry else None}
        for name, entry in manifest["artifacts"].items()
    }
    return {"graphs": graphs, "llm": (manifest.get("llm") or {}).get("parity")}


# -- the rehearsal -------------------------------------------------------------------------


def rehearse(
    preset_name: str, layers: int, work: Path, frames: int, cpu_llm: str, max_new_tokens: int, keep: bool = False
) -> dict[str, Any]:
    """All phases in order (those ``work`` records as completed are skipped), stopping at the
    first failure; returns the results.

    Unless ``keep``, each folder is deleted once nothing later needs it (the checkpoint after
    the conversion, the jetson export once measured), so the disk holds at most ~2 of them.
    """
    from loc3r.runtime.demo_video import write_demo_video

    preset = PRESETS[preset_name]
    llava, cut3r, bundle = work / "llava", work / "cut3r_512_dpt.pth", work / "bundle"
    jetson, cpu = work / "export_jetson", work / "export_cpu"
    video = write_demo_video(work / "video.mp4", num_frames=4 * frames, width=640, height=480)
    run_args = [str(video), QUESTION, "--model", str(bundle), "--frames", str(frames), "--json", "--no-cache",
                "--max-new-tokens", str(max_new_tokens)]
    plan = [
        ("write_llava", "loc3r.bench.real_size:write_llava_main", [str(llava), preset_name, str(layers)], [llava]),
        ("write_cut3r", "loc3r.bench.real_size:write_cut3r_main", [str(cut3r), preset_name], [cut3r]),
        ("convert", "loc3r.models.convert_cli:main", ["--llava", str(llava), "--cut3r", str(cut3r), "--out", str(bundle), *preset.convert_flags], [bundle]),
        ("export_jetson", "loc3r.export.cli:main", ["--model", str(bundle), "--target", "jetson-orin", "--out", str(jetson)], [jetson]),
        ("export_cpu", "loc3r.export.cli:main", ["--model", str(bundle), "--target", "cpu", "--out", str(cpu), "--llm", cpu_llm], [cpu]),
        ("run_onnxruntime", "loc3r.runtime.cli:main", [*run_args, "--backend", "onnxruntime", "--engines", str(cpu)], []),
        ("run_torch", "loc3r.runtime.cli:main", [*run_args, "--backend", "torch"], []),
    ]
    done_with = {"convert": [llava, cut3r], "export_jetson": [jetson]}
    settings = {"preset": preset_name, "llm_layers": layers, "frames": frames, "cpu_llm": cpu_llm, "max_new_tokens": max_new_tokens}
    results = earlier_results(work, settings)
    completed = {p["name"] for p in results["phases"]}
    for name, target, args, outputs in plan:
        if name in completed:
            print(f"[real_size] {name}: completed earlier in {work}", file=sys.stderr, flush=True)
            continue
        print(f"[real_size] {name} ...", file=sys.stderr, flush=True)
        phase, stdout = run_phase(name, target, args, work, outputs)
        results["phases"].append(asdict(phase))
        print(f"[real_size] {name}: exit {phase.exit}, {phase.wall_s} s, peak RSS {phase.peak_rss_bytes / GIB:.2f} GiB"
              f" (subprocesses {phase.peak_rss_subprocess_bytes / GIB:.2f} GiB)", file=sys.stderr, flush=True)
        if name.startswith("run_") and phase.exit == 0:
            answer = json.loads(stdout.strip().splitlines()[-1])
            results["answers"][name] = {"model": answer["model"], "timings": answer["timings"], "answer_token_ids": answer["answer_token_ids"]}
        if phase.exit != 0:
            break
        if name.startswith("export_"):
            manifest = json.loads((outputs[0] / "manifest.json").read_text(encoding="utf-8"))
            results["artifacts"][name.removeprefix("export_")] = artifact_rows(outputs[0], bundle, manifest)
            results.setdefault("checks", {})[name.removeprefix("export_")] = export_checks(manifest)
        if name == "convert":
            results.update(checkpoint_bytes=tree_bytes(llava) + tree_bytes(cut3r), bundle_bytes=tree_bytes(bundle),
                           largest_source_file_bytes=max(tree_bytes(f) for f in [cut3r, *llava.glob("*.safetensors")]),
                           bundle_parameters=sum(bundle_parameters(bundle).values()))
        save_progress(work, results)
        for path in [] if keep else done_with.get(name, []):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    results.pop("settings")
    return results


def earlier_results(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """What completed phases in ``work`` recorded (its progress file), or a fresh start; a
    folder rehearsed with other settings is refused rather than mixed."""
    path = work / PROGRESS_FILE
    if not path.is_file():
        return {"settings": settings, "phases": [], "answers": {}, "artifacts": {}}
    results = json.loads(path.read_text(encoding="utf-8"))
    if results["settings"] != settings:
        raise SystemExit(f"real_size: {work} holds a rehearsal with other settings ({results['settings']}); "
                         "resume it with those, or use an empty folder")
    return results


def save_progress(work: Path, results: dict[str, Any]) -> None:
    """Record the completed phases (atomically: a stop never leaves half a file)."""
    with atomic_file(work / PROGRESS_FILE) as stream:
        stream.write(json.dumps(results, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.real_size", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="real")
    parser.add_argument("--llm-layers", type=int, help="Qwen2 layers to write (default: all of the preset's, 28)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--cpu-llm", default="int4", choices=("fp32", "fp16", "int8", "int4"),
                        help="LLM format of the cpu export (default int4: a float32 7B decoder is ~30 GB)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--rss-limit-gib", type=float, default=20.0, help="peak RSS every phase must stay under")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints, bundle and exports go (~40 GB at full depth)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and every phase's outputs")
    parser.add_argument("--resume", type=Path, metavar="DIR",
                        help="work in DIR (kept until every phase completes) and skip the phases that completed there")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    layers = args.llm_layers or preset.config["num_hidden_layers"]
    if args.resume:
        if not resumable(args.resume):
            parser.error(f"--resume {args.resume} holds files no rehearsal wrote (it is removed once the rehearsal "
                         "completes): name a new or empty folder, or one a rehearsal was resumed in")
        args.resume.mkdir(parents=True, exist_ok=True)
    stem = "real_size" if args.preset == "real" else f"real_size_{args.preset}"
    command = ["python", "-m", "loc3r.bench.real_size", *(sys.argv[1:] if argv is None else argv)]
    recording = start(stem, command, "none: the phases in order, each one child process (peak memory, not a timed comparison)", 1,
                      args.allow_unreachable or outside_results(args.out / f"{stem}.json"))
    work = args.resume or Path(tempfile.mkdtemp(prefix="loc3r_real_size_", dir=args.workdir))
    results: dict[str, Any] = {"phases": []}
    reported = False
    try:
        results = rehearse(args.preset, layers, work, args.frames, args.cpu_llm, args.max_new_tokens, args.keep)
        results.update(preset=args.preset, llm_layers=layers, full_layers=preset.config["num_hidden_layers"],
                       frames=args.frames, cpu_llm=args.cpu_llm, rss_limit_gib=args.rss_limit_gib, machine=machine_info(),
                       provenance=recording.finish())
        write_report(results, args.out, stem)
        reported = True
    finally:  # a resumable folder goes only once its rehearsal is complete and reported
        if not args.keep and (not args.resume or (reported and completed(results, args.rss_limit_gib))):
            shutil.rmtree(work, ignore_errors=True)
    return 0 if completed(results, args.rss_limit_gib) else 1


def write_report(results: dict[str, Any], out: Path, stem: str) -> None:
    """``stem.json`` (the figures) and ``stem.md`` (the report) in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / f"{stem}.json") as stream:
        stream.write(json.dumps(results, indent=2) + "\n")
    with atomic_file(out / f"{stem}.md") as stream:
        stream.write(render(results))


def resumable(folder: Path) -> bool:
    """A folder ``--resume`` may work in (and remove when done): new, empty, or a rehearsal's."""
    if not folder.exists():
        return True
    return folder.is_dir() and (not any(folder.iterdir()) or (folder / PROGRESS_FILE).is_file())


def completed(results: dict[str, Any], rss_limit_gib: float) -> bool:
    """Every phase ran, exited 0, and kept each of its processes under the RSS limit."""
    phases = results["phases"]
    return [p["name"] for p in phases] == list(PHASES) and all(p["exit"] == 0 and peak_rss(p) < rss_limit_gib * GIB for p in phases)


def peak_rss(phase: dict[str, Any]) -> int:
    """The phase's largest process: itself or a subprocess it ran."""
    return max(phase["peak_rss_bytes"], phase.get("peak_rss_subprocess_bytes", 0))


# -- extrapolation to full depth -----------------------------------------------------------

LLM_TIMINGS = ("prefill_video", "prefill_question")  # scale with the layer count (prefill_video: the time instruction too)
DECODE_TIMING = "decode_tokens_per_s"


def extrapolate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each phase's peak RSS, wall time and disk at the preset's full depth, from what was
    measured at ``llm_layers`` and what the phase holds per LLM parameter (``basis``)."""
    preset = PRESETS[results["preset"]]
    measured, full = results["llm_layers"], results["full_layers"]
    if measured >= full:
        return []

    def shapes(layers: int) -> dict[str, tuple[int, ...]]:
        return llava_next_shapes({**preset.config, "num_hidden_layers": layers}, preset.tower)

    params_at = {n: parameter_count(shapes(n)) for n in (measured, full)}
    extra = params_at[full] - params_at[measured]
    layer_ratio = full / measured
    bytes_ratio = params_at[full] / params_at[measured]
    cpu_bits = bits_per_weight(results["cpu_llm"], 32 if results["cpu_llm"] in ("int4", "int8") else None, 32)
    rows = []
    for phase in results["phases"]:
        name, rss, wall, disk = phase["name"], phase["peak_rss_bytes"], phase["wall_s"], phase["write_bytes"]
        if name == "write_llava":
            row = (rss, wall * bytes_ratio, disk * bytes_ratio, "one tensor at a time: the largest (the embedding) does not grow; time and bytes scale with the checkpoint")
        elif name == "write_cut3r":
            row = (rss, wall, disk, "does not depend on the LLM")
        elif name == "convert":
            grown = rss - results.get("largest_source_file_bytes", 0) + min(preset.max_shard_bytes, 2 * params_at[full])
            row = (grown, wall * bytes_ratio, disk * bytes_ratio,
                   f"streamed: one source shard's mapped pages (shards of {preset.max_shard_bytes / 1e9:g} GB) plus one tensor")
        elif name.startswith("export_"):
            llm_step = next((s["s"] for label, s in phase["steps"].items() if "LLM" in label), 0.0)
            decoder = next((r["bytes"] for r in results["artifacts"].get(name.removeprefix("export_"), [])
                            if r["file"].startswith("llm/decoder.onnx")), 0)
            row = (rss + extra * decoder / decoder_parameters(shapes(measured)), wall + llm_step * (layer_ratio - 1),
                   disk * bytes_ratio,
                   "the builder streams the LLM in a subprocess and the parity probe's PyTorch reference holds one "
                   "layer; the exporter's own peak grows with the written decoder the probe loads (its bytes per parameter)")
        elif name == "run_onnxruntime":
            timings = results["answers"].get(name, {}).get("timings", {})
            llm_s = sum(timings.get(k, 0.0) for k in LLM_TIMINGS)
            row = (rss + extra * cpu_bits / 8, wall + llm_s * (layer_ratio - 1), disk,
                   f"the {results['cpu_llm']} decoder grows by {cpu_bits / 8:.3f} bytes per parameter; LLM prefill x {layer_ratio:.0f}")
        elif name == "run_torch":
            answer = results["answers"].get(name, {})
            ran = getattr(torch, answer.get("model", {}).get("dtype", "float32"))
            measured_total = results.get("bundle_parameters", 0)
            chosen = choose_precision(WeightStats(measured_total + extra, torch.bfloat16), "auto", torch.device("cpu"),
                                      available_memory_bytes(), False)
            grown = rss + (measured_total + extra) * chosen.dtype.itemsize - measured_total * ran.itemsize
            llm_s = sum(answer.get("timings", {}).get(k, 0.0) for k in LLM_TIMINGS)
            row = (grown, wall + llm_s * (layer_ratio - 1), disk,
                   f"ran in {str(ran).removeprefix('torch.')}; at full depth '{chosen.reason}'; LLM prefill x {layer_ratio:.0f}"
                   + (" (bfloat16 on a CPU without bfloat16 units is slower than this)" if chosen.dtype != ran else ""))
        else:
            continue
        rows.append({"phase": name, "peak_rss_bytes": int(row[0]), "wall_s": round(row[1], 1), "write_bytes": int(row[2]), "basis": row[3]})
    return rows


def decoder_parameters(shapes: dict[str, tuple[int, ...]]) -> int:
    """Parameters of the exported LLM decoder: the layers, the final norm and lm_head (the
    embedding table is exported beside it)."""
    return sum(math.prod(shape) for name, shape in shapes.items() if name.startswith(("model.layers.", "model.norm.", "lm_head.")))


# -- report --------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    """The markdown report (measured figures; the extrapolation notes are added by hand)."""
    m = results["machine"]
    lines = [
        "# Dress rehearsal at real size",
        "",
        *header(results["provenance"]),
        f"Torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}. Random weights in the published "
        f"layouts: every width is real; the LLM has {results['llm_layers']} of its {results['full_layers']} layers. "
        f"Video: {results['frames']} frames of 640x480; cpu export LLM: {results['cpu_llm']}.",
        "",
        "## Phases",
        "",
        f"Each phase is one child process; peak RSS is its `VmHWM`, subprocess peak RSS the largest own `VmHWM` of "
        f"the processes it ran (the LLM builder), sampled by pid while they run; each must stay under "
        f"{results['rss_limit_gib']} GiB. Written is "
        "`write_bytes` of /proc/self/io, output is the size of what the phase produced.",
        "",
        "| phase | exit | wall s | peak RSS GiB | subprocess peak RSS GiB | written GiB | output GiB | steps: time, peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in results["phases"]:
        steps = ", ".join(f"{k}: {v['s']} s, {v['peak_rss_gib']} GiB" for k, v in p["steps"].items())
        lines.append(f"| {p['name']} | {p['exit']} | {p['wall_s']} | {p['peak_rss_bytes'] / GIB:.2f} | "
                     f"{p.get('peak_rss_subprocess_bytes', 0) / GIB:.2f} | "
                     f"{p['write_bytes'] / GIB:.2f} | {p['output_bytes'] / GIB:.2f} | {steps} |")
    failed = [p for p in results["phases"] if p["exit"] != 0]
    if failed:
        lines += ["", f"**{failed[0]['name']} failed**: `{failed[0]['error']}`"]
    if "bundle_bytes" in results:
        lines += ["", f"Checkpoint files {results['checkpoint_bytes'] / GIB:.2f} GiB; bundle {results['bundle_bytes'] / GIB:.2f} GiB."]
    lines.append("")
    for name, answer in results["answers"].items():
        model, timings = answer["model"], answer["timings"]
        shown = ", ".join(f"{k} {v:.2f}" for k, v in timings.items() if isinstance(v, float))
        lines.append(f"- `{name}`: {model['dtype']} on {model['device']} ({model['dtype_reason']}); {shown}")
    rows = extrapolate(results)
    if rows:
        lines += ["", f"## Extrapolation to {results['full_layers']} LLM layers", "",
                  f"From the figures above at {results['llm_layers']} layers and what each phase holds per LLM "
                  "parameter (basis); an estimate, not a measurement.", "",
                  "| phase | peak RSS GiB | wall s | written GiB | basis |", "|---|---|---|---|---|"]
        for row in rows:
            over = " **over**" if row["peak_rss_bytes"] >= results["rss_limit_gib"] * GIB else ""
            lines.append(f"| {row['phase']} | {row['peak_rss_bytes'] / GIB:.1f}{over} | {row['wall_s']} | "
                         f"{row['write_bytes'] / GIB:.1f} | {row['basis']} |")
    if results.get("checks"):
        lines += ["", "## What the exports checked (their manifests)", "",
                  "Each graph through ONNX Runtime FP32 against PyTorch FP32 (max |error| over the runs), its FP16 graph's "
                  "error relative to the output scale (FP16 targets), and the LLM decoder against transformers' Qwen2 "
                  "in float32 on the same weights.", "",
                  "| export | graph | max abs error | runs | FP16 error / scale |", "|---|---|---|---|---|"]
        for export, checks in results["checks"].items():
            for name, graph in checks["graphs"].items():
                fp16 = "-" if graph["fp16_relative"] is None else f"{graph['fp16_relative']:.2e}"
                lines.append(f"| {export} | {name} | {graph['max_abs']:.2e} | {graph['runs']} | {fp16} |")
        lines.append("")
        for export, checks in results["checks"].items():
            parity = checks["llm"]
            lines.append(f"- `{export}` LLM decoder vs transformers' Qwen2: "
                         + ("not run" if parity is None else ", ".join(f"{k} {v}" for k, v in parity.items())))
    lines += ["", "## Exported files vs predicted sizes", "",
              "Predicted by the exporter's memory plan from the bundle's config: a graph at its float32 weights, an "
              f"FP16 graph at what the FP16 target loads, the LLM at its form; within = {PREDICTION_TOLERANCE:.0%}.", ""]
    for export, rows in results["artifacts"].items():
        lines += [f"### {export}", "", "| file | MB | predicted MB | ratio | within |", "|---|---|---|---|---|"]
        for row in rows:
            predicted = f"{row['predicted'] / 1e6:.1f}" if row["predicted"] else "-"
            ratio = f"{row['ratio']:.3f}" if row["ratio"] else "-"
            within = {True: "yes", False: "**no**", None: "-"}[row["within"]]
            lines.append(f"| {row['file']} | {row['bytes'] / 1e6:.1f} | {predicted} | {ratio} | {within} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
