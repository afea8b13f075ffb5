"""Where CUT3R's recurrent step spends its time on ONNX Runtime, and what the session's
options change: ``python -m loc3r.bench.cut3r_profile --engines DIR [--baseline DIR] [--frames N]
[--markdown F] [--json F]``.

On an export's ``cut3r_encoder`` + ``cut3r_step`` (its FP32 graphs and, when the export has
them, the INT8 forms), N frames at 16:9 are encoded once, then stepped in order: for each
session configuration the step's CPU-seconds per frame (``time.process_time``: machine load
cannot decide it) and wall, interleaved configuration by configuration, and, from ONNX
Runtime's own profiler on the default configuration, the share of step time per op type.
Every configuration must give the same camera tokens as the default within the graph's
recorded tolerance (FP32) or its recorded INT8 error; the largest difference is reported.
``runtime + I/O binding`` keeps state and memory in ONNX Runtime's own buffers (``OrtValue``)
from step to step instead of numpy. ``--baseline`` adds another export's step graphs (e.g. one
written before a change) to the same rounds, with the runtime's options. Each session's
creation is timed too (CPU-s, this process).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loc3r.export.manifest import load_manifest
from loc3r.fileio import write_json_atomic, write_text_atomic
from loc3r.runtime.ort import import_onnxruntime, session_options

Options = Callable[[], Any]
RUNTIME = "runtime (all optimizations, arena on)"  # what loc3r ships for the step


def configurations() -> dict[str, Options]:
    """The session options compared: the runtime's, and one change at a time."""
    ort = import_onnxruntime()

    def changed(**attrs: Any) -> Options:
        def make() -> Any:
            options = session_options(threads=2, arena=True)
            for name, value in attrs.items():
                setattr(options, name, value)
            return options

        return make

    return {
        RUNTIME: lambda: session_options(threads=2, arena=True),
        "extended optimizations": changed(graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
        "basic optimizations": changed(graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        "arena off": changed(enable_cpu_mem_arena=False),
    }


def step_inputs(manifest_dir: Path, graph_file: Callable[[str], Path], frames: int) -> tuple[list[dict[str, np.ndarray]], Any]:
    """Encoder features of ``frames`` fixed 16:9 frames, and the initial state/memory."""
    from safetensors.numpy import load_file

    manifest = load_manifest(manifest_dir)
    long_side = manifest.data["cut3r_input"]["long_side"]
    height = long_side * 9 // 16 // 16 * 16
    images = np.random.default_rng(1234).uniform(-1, 1, (frames, 3, height, long_side)).astype(np.float32)
    ort = import_onnxruntime()
    encoder = ort.InferenceSession(str(graph_file("cut3r_encoder")), session_options(threads=2), providers=["CPUExecutionProvider"])
    features, positions = encoder.run(["features", "positions"], {"image": images})
    init = load_file(str(manifest.file(manifest.value("artifacts", "cut3r_step", "initial_state"))))
    return [{"features": features[i : i + 1], "positions": positions} for i in range(frames)], init


def run_bound(session: Any, frames: list[dict[str, np.ndarray]], init: dict[str, np.ndarray]) -> tuple[list[np.ndarray], float, float]:
    """:func:`run_steps` with I/O binding: state and memory stay ``OrtValue`` between frames."""
    ort = import_onnxruntime()
    state, memory = (ort.OrtValue.ortvalue_from_numpy(init[name]) for name in ("state", "memory"))
    cameras = []
    cpu, wall = time.process_time(), time.perf_counter()
    for index, frame in enumerate(frames):
        binding = session.io_binding()
        for name, value in frame.items():
            binding.bind_cpu_input(name, value)
        binding.bind_ortvalue_input("state", state)
        binding.bind_ortvalue_input("memory", memory)
        binding.bind_cpu_input("first_frame", np.array([1.0 if index == 0 else 0.0], dtype=np.float32))
        for name in ("camera", "new_state", "new_memory"):
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        camera, state, memory = binding.get_outputs()
        cameras.append(camera.numpy())
    return cameras, (time.process_time() - cpu) / len(frames), (time.perf_counter() - wall) / len(frames)


def run_steps(session: Any, frames: list[dict[str, np.ndarray]], init: dict[str, np.ndarray]) -> tuple[list[np.ndarray], float, float]:
    """The recurrence: camera tokens, CPU-seconds and wall seconds per frame."""
    state, memory, cameras = init["state"], init["memory"], []
    cpu, wall = time.process_time(), time.perf_counter()
    for index, frame in enumerate(frames):
        first = np.array([1.0 if index == 0 else 0.0], dtype=np.float32)
        camera, state, memory = session.run(["camera", "new_state", "new_memory"], {**frame, "state": state, "memory": memory, "first_frame": first})
        cameras.append(camera)
    return cameras, (time.process_time() - cpu) / len(frames), (time.perf_counter() - wall) / len(frames)


def op_shares(session_file: Path, options: Any, frames: list[dict[str, np.ndarray]], init: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of the step's kernel time per op type, from ONNX Runtime's profiler."""
    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "step")
        session = ort.InferenceSession(str(session_file), options, providers=["CPUExecutionProvider"])
        run_steps(session, frames, init)
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    times: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    total = sum(times.values()) or 1
    return {op: t / total for op, t in times.most_common()}


def step_forms(engines: Path, label: str = "") -> dict[str, Path]:
    """The FP32 step graph of an export and, when it has one, its INT8 form."""
    manifest = load_manifest(engines)
    artifact = manifest.artifacts["cut3r_step"]
    forms = {f"fp32{label}": manifest.artifact_path("cut3r_step")}
    if "int8" in artifact:
        forms[f"int8{label}"] = manifest.file(artifact["int8"]["file"])
    return forms


def main(argv: Sequence[str] | None = None) -> int:
    from loc3r.bench import provenance

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.cut3r_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True, type=Path, help="a folder written by loc3r-export (CUT3R bundle)")
    parser.add_argument("--baseline", type=Path, help="another export whose step graphs join the rounds (runtime options)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    recording = provenance.start(
        "cut3r_step", ["python", "-m", "loc3r.bench.cut3r_profile", *argv],
        "each (graph, configuration) once per round, same order every round", args.repeat, args.allow_unreachable,
    )
    manifest = load_manifest(args.engines)
    forms = step_forms(args.engines)
    frames, init = step_inputs(args.engines, lambda name: manifest.artifact_path(name), args.frames)
    ort = import_onnxruntime()
    cases: dict[tuple[str, str], tuple[Path, Options, Callable[..., Any]]] = {}
    for form, path in forms.items():
        for name, make in configurations().items():
            cases[(form, name)] = (path, make, run_steps)
        cases[(form, "runtime + I/O binding")] = (path, configurations()[RUNTIME], run_bound)
    if args.baseline:
        for form, path in step_forms(args.baseline, " (baseline)").items():
            cases[(form, RUNTIME)] = (path, configurations()[RUNTIME], run_steps)
    sessions, created = {}, {}
    for key, (path, make, _) in cases.items():
        cpu = time.process_time()
        sessions[key] = ort.InferenceSession(str(path), make(), providers=["CPUExecutionProvider"])
        created[key] = time.process_time() - cpu
    rows: dict[tuple[str, str], list[tuple[float, float]]] = collections.defaultdict(list)
    tokens: dict[tuple[str, str], list[np.ndarray]] = {}
    for _ in range(args.repeat):  # interleaved: each case once per round
        for key, session in sessions.items():
            cameras, cpu, wall = cases[key][2](session, frames, init)
            rows[key].append((cpu, wall))
            tokens[key] = cameras
    reference = tokens[("fp32", RUNTIME)]
    shares = op_shares(forms["fp32"], configurations()[RUNTIME](), frames, init)
    record = recording.finish()
    results = []
    for key, values in rows.items():
        diff = max(float(np.abs(a - b).max()) for a, b in zip(tokens[key], reference, strict=True))
        results.append({
            "graph": key[0], "options": key[1], "session_create_cpu_s": round(created[key], 3),
            "cpu_s_per_frame": [round(v[0], 4) for v in values], "wall_s_per_frame": [round(v[1], 4) for v in values],
            "median_cpu_s_per_frame": round(float(np.median([v[0] for v in values])), 4),
            "median_wall_s_per_frame": round(float(np.median([v[1] for v in values])), 4),
            "max_abs_diff_vs_fp32_runtime": diff,
        })  # fmt: skip
    lines = [
        f"# CUT3R step on ONNX Runtime: {manifest.data['model']['id']} (random weights), {args.frames} frames at 16:9, 2 threads",
        "",
        *provenance.header(record),
        "",
        f"Graphs: opset {manifest.data['opset']}, {manifest.artifacts['cut3r_step'].get('fused_attention', 0)} fused Attention node(s) in the step"
        + (f"; baseline {args.baseline.name}: opset {load_manifest(args.baseline).data['opset']}" if args.baseline else "") + ".  ",
        "Medians over the rounds; CPU-seconds per frame (process time) beside wall. Max |diff| is against the FP32 graph with the runtime's options.",
        "",
        "| graph | session options | CPU-s / frame | wall s / frame | session creation CPU-s | max abs diff of camera tokens |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['graph']} | {r['options']} | {r['median_cpu_s_per_frame']:.3f} | {r['median_wall_s_per_frame']:.3f} | "
        f"{r['session_create_cpu_s']:.2f} | {r['max_abs_diff_vs_fp32_runtime']:.2e} |"
        for r in results
    ]
    lines += ["", "Share of the FP32 step's kernel time per op type (ONNX Runtime profiler, runtime options):", ""]
    lines += ["| op type | share |", "|---|---|"]
    lines += [f"| {op} | {share:.1%} |" for op, share in list(shares.items())[:10]]
    text = "\n".join(lines) + "\n"
    if args.markdown:
        write_text_atomic(args.markdown, text)
    if args.json:
        write_json_atomic(args.json, {"provenance": record, "results": results, "op_shares": shares})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
