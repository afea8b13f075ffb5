"""``loc3r-bench``: per-stage latency and memory of our runtime against transformers'
llava-onevision + CUT3R, with and without a prefix cache, measured in one run and reported
as ratios (JSON, markdown, PNG bar chart)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loc3r.cli_support import ArgumentParser, run_cli
from loc3r.errors import InputError
from loc3r.progress import announce_loading

if TYPE_CHECKING:
    from loc3r.bench.provenance import Recording
    from loc3r.models.bundle import Bundle
    from loc3r.models.config import Loc3rConfig
    from loc3r.runtime.pipeline import Pipeline

PROG = "loc3r-bench"
BACKEND_CHOICES = ("torch", "onnxruntime", "tensorrt")
QUESTIONS = ("Where am I standing?", "What is in front of me?")
BASELINES = {"transformers": "transformers", "transformers_prefix_cache": "transformers + prefix cache"}
DEFAULT_REPEAT = {"tiny": 3, "small": 3}  # medians of 3 where a run is under a minute; other models (minutes a run): 2
DEMO_VIDEO = {"num_frames": 96, "width": 640, "height": 480, "fps": 8}


def bench_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1])
    parser.add_argument("--model", default="tiny", help="'tiny', 'small' (random, real token geometry) or a bundle folder")
    parser.add_argument("--backend", nargs="+", choices=BACKEND_CHOICES, default=["torch"], help="optimized backends to measure")
    parser.add_argument("--engines", help="folder written by loc3r-export (default for onnxruntime on tiny/small: export one into a temp folder)")
    parser.add_argument("--video", help="video to run on (default: a generated 640x480 demo video, 96 frames)")
    parser.add_argument("--frames", type=int, default=32, help="frames sampled from the video (default 32)")
    parser.add_argument("--repeat", type=int, help="measured repeats (default 3 for tiny and small, 2 otherwise)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens timed for decode tok/s (default 16)")
    parser.add_argument("--target", action="append", help="target profile for the roofline floor (repeatable; default cpu)")
    parser.add_argument("--json", help="write the full result here")
    parser.add_argument("--markdown", help="write the markdown report here")
    parser.add_argument("--plot", help="write the PNG bar chart here")
    parser.add_argument("--plot-size", default="1200x600", help="PNG size in pixels, WxH (default 1200x600)")
    parser.add_argument("--fresh-process", action="store_true",
                        help="instead of stages in one process: each side as a user runs it, a fresh process from start "
                             "to first token (loc3r-run per --backend vs transformers + CUT3R), CPU-seconds, wall, peak RSS")
    parser.add_argument("--also-engines", action="append", default=[], metavar="DIR",
                        help="--fresh-process: one more loc3r-run onnxruntime side per export (e.g. one with --encoders int8)")
    parser.add_argument("--cpus", type=parse_cpus, metavar="LIST",
                        help="--fresh-process: pin every side to these CPUs, e.g. 0 or 0,1 (thread pools follow: "
                             "one CPU is one thread per side; default: all CPUs)")
    parser.add_argument("--allow-unreachable", action="store_true",
                        help="write into benchmarks/results from code not on main (the result says so)")
    parser.add_argument("--debug", action="store_true")
    return parser


def parse_cpus(text: str) -> frozenset[int]:
    """``--cpus 0,2`` -> {0, 2}, each one this process may run on."""
    allowed = os.sched_getaffinity(0)
    try:
        cpus = frozenset(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of CPU numbers (e.g. 0 or 0,1)") from None
    if not cpus or not cpus <= allowed:
        raise argparse.ArgumentTypeError(f"CPU(s) {text} not available here; this machine offers {','.join(map(str, sorted(allowed)))}")
    return cpus


def parse_plot_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--plot-size {text!r} is not WxH", "write it like 1200x600") from None
    if not (100 <= width <= 10000 and 100 <= height <= 10000):
        raise InputError(f"--plot-size {text} is out of range", "use 100..10000 pixels per side")
    return width, height


def check_args(args: argparse.Namespace) -> None:
    """Refuse counts the benchmark cannot run with, before anything is loaded."""
    minimum = {"frames": 1, "repeat": 1, "warmup": 0, "decode_tokens": 2}  # decode rate needs 2 tokens
    for name, least in minimum.items():
        value = getattr(args, name)
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be at least {least}, got {value}", f"pass {flag} {least} or more")
    if "tensorrt" in args.backend and not args.engines:
        raise InputError("--backend tensorrt needs --engines DIR", "build the engines on the device with loc3r-export build")
    for flag, given in (("--cpus", args.cpus), ("--also-engines", args.also_engines)):
        if given and not args.fresh_process:
            raise InputError(f"{flag} applies to --fresh-process runs only", f"add --fresh-process, or drop {flag}")
    parse_plot_size(args.plot_size)


@contextlib.contextmanager
def engines_for(args: argparse.Namespace, bundle: Bundle) -> Iterator[Path | None]:
    """``--engines``, or for a preset model an export into a temporary folder, or None
    when no exported backend was asked for."""
    if args.engines:
        yield Path(args.engines)
        return
    if "onnxruntime" not in args.backend:
        yield None
        return
    from loc3r.bench.presets import PRESETS

    if str(args.model) not in PRESETS:
        raise InputError("--backend onnxruntime on a bundle folder needs --engines DIR", "run loc3r-export --out DIR first")
    from loc3r.engines.targets import load_target
    from loc3r.export.exporter import ExportRequest, export_all

    target = load_target("cpu")
    with tempfile.TemporaryDirectory(prefix="loc3r-bench-engines-") as tmp:
        print(f"{PROG}: exporting {args.model} for onnxruntime into a temporary folder ...", file=sys.stderr)
        request = ExportRequest(
            bundle=bundle,
            target=target,
            out_dir=Path(tmp) / "engines",
            llm_quant=target.llm.weights,
        )
        export_all(request, progress=lambda m: None)
        yield request.out_dir


@contextlib.contextmanager
def video_for(args: argparse.Namespace) -> Iterator[Path]:
    if args.video:
        yield Path(args.video)
        return
    from loc3r.runtime.demo_video import write_demo_video

    with tempfile.TemporaryDirectory(prefix="loc3r-bench-video-") as tmp:
        yield write_demo_video(Path(tmp) / "scene.mp4", **DEMO_VIDEO)


def run_bench(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Warm up, then alternate the baselines and the optimized runs; the result document."""
    loaded = announce_loading(PROG, f"model {args.model} and the baselines")
    from loc3r.bench.baseline import Baseline
    from loc3r.bench.memory import RssSampler, peak_rss_mib
    from loc3r.bench.optimized import run_optimized
    from loc3r.bench.presets import resolve_bench_model
    from loc3r.bench.report import machine_info
    from loc3r.runtime.pipeline import Pipeline

    repeat = args.repeat or DEFAULT_REPEAT.get(str(args.model), 2)
    machine = machine_info()
    model_dir = resolve_bench_model(args.model)
    reference = Pipeline.from_pretrained(model_dir, "torch")
    loaded()
    bundle = reference.bundle
    if bundle.config.encoder_3d != "cut3r":
        raise InputError(
            f"{PROG} models the reference CUT3R pipeline; {bundle.config.model_id} uses {bundle.config.encoder_3d}",
            "compare 3D encoders with: python -m loc3r.bench.encoders_3d",
        )
    reference.check_frames_fit(args.frames)
    baseline = Baseline(bundle)
    with video_for(args) as video, engines_for(args, bundle) as engines, RssSampler() as sampler:
        pipelines = {b: reference if b == "torch" else Pipeline.from_pretrained(model_dir, b, engines) for b in args.backend}
        formats = {**dict.fromkeys(BASELINES, baseline.llm_format), **{b: llm_format(p, engines) for b, p in pipelines.items()}}
        size = cut3r_size(video, bundle.config.cut3r_long_side)
        runs: dict[str, list[dict[str, float]]] = {**{name: [] for name in BASELINES}, **{b: [] for b in pipelines}}
        held = 0.0
        for i in range(args.warmup + repeat):
            measured = i >= args.warmup
            print(f"{PROG}: {'run' if measured else 'warm-up'} {i + 1 - args.warmup * measured}", file=sys.stderr)
            order = ["baseline", *pipelines]
            for name in order if i % 2 == 0 else order[::-1]:  # alternate: load drift hits both sides
                with sampler.phase(phase_name(name)) if measured else contextlib.nullcontext():
                    if name == "baseline":
                        run = baseline.run(video, args.frames, QUESTIONS, args.decode_tokens)
                        seconds, held = run.seconds, run.frames_in_memory_mib
                    else:
                        seconds = {name: run_optimized(pipelines[name], video, args.frames, QUESTIONS, args.decode_tokens)}
                if measured:
                    for key, values in seconds.items():
                        runs[key].append(values)
    memory = {"phases": sampler.phases, "process_peak_rss_mib": peak_rss_mib()}
    return assemble(args, command, machine, bundle.config, runs, memory, held, formats, size, repeat)


def run_fresh_bench(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """``--fresh-process``: the transformers script and ``loc3r-run`` per backend, each run
    as a fresh process, in turn (``loc3r.bench.fresh``)."""
    from loc3r.bench.fresh import loc3r_run, run_fresh, transformers_run
    from loc3r.bench.presets import resolve_bench_model
    from loc3r.bench.report import machine_info
    from loc3r.models.bundle import load_bundle

    repeat = args.repeat or DEFAULT_REPEAT.get(str(args.model), 2)
    machine = machine_info()
    model_dir = resolve_bench_model(args.model)
    bundle = load_bundle(model_dir)
    question = QUESTIONS[0]
    with video_for(args) as video, engines_for(args, bundle) as engines:
        sides = {"transformers": transformers_run(video, question, str(model_dir), args.frames)}
        exports = {}
        for backend in args.backend:
            name = f"loc3r-run {backend}" + (f" ({encoders_of(engines)} encoders)" if backend != "torch" else "")
            sides[name] = loc3r_run(video, question, str(model_dir), args.frames, backend, None if backend == "torch" else engines)
            exports[name] = engines if backend != "torch" else None
        for extra in map(Path, args.also_engines):
            name = f"loc3r-run onnxruntime ({encoders_of(extra)} encoders, {extra.name})"
            sides[name] = loc3r_run(video, question, str(model_dir), args.frames, "onnxruntime", extra)
            exports[name] = extra
        fresh = run_fresh(sides, repeat, args.warmup, log=lambda line: print(f"{PROG}: {line}", file=sys.stderr), cpus=args.cpus)
    for name, text in fresh["commands"].items():  # the temporary paths, as the reader would write them
        text = text.replace(str(video), "VIDEO").replace(str(model_dir), "MODEL_DIR")
        fresh["commands"][name] = text.replace(str(Path(sys.executable).with_name("loc3r-run")), "loc3r-run").replace(sys.executable, "python")
    return {
        "command": command,
        "machine": machine,
        "model": bundle.config.model_id,
        "frames": args.frames,
        "repeat": repeat,
        "warmup": args.warmup,
        "exports": {name: llm_format_of(path) for name, path in exports.items() if path},
        "fresh_process": fresh,
    }


def encoders_of(engines: Path) -> str:
    """The precision an export's encoder graphs run in (``fp32`` or ``int8``)."""
    from loc3r.export.manifest import load_manifest

    return load_manifest(engines).encoders


def llm_format_of(engines: Path) -> str:
    """The exported LLM's form, from the manifest."""
    from loc3r.export.manifest import load_manifest

    manifest = load_manifest(engines)
    llm = manifest.data.get("llm")
    if not llm:
        return "the manifest has no LLM"
    quant = llm.get("quantization", {})
    return f"LLM {quant.get('layers', '?')} layers, {quant.get('lm_head', '?')} lm_head; graphs {manifest.precision}, encoders {manifest.encoders}"


def llm_format(pipeline: Pipeline, engines: Path | None) -> str:
    """What the LLM of ``pipeline`` runs as: precision and runtime (from the export's manifest)."""
    backend, torch_dtype = pipeline.model_info.backend, pipeline.bundle.precision.dtype_name
    if backend == "torch":
        return f"torch {torch_dtype} (eager, SDPA, reserved KV cache)"
    from loc3r.export.manifest import load_manifest

    llm = load_manifest(engines).data.get("llm") if engines else None
    if not llm:
        return f"torch {torch_dtype} (the manifest has no LLM)"
    quant = llm.get("quantization", {})
    return f"{backend} {quant.get('layers', '?')} layers, {quant.get('lm_head', '?')} lm_head ({llm['decoder']['file']})"


def phase_name(run: str) -> str:
    return run if run == "baseline" else f"optimized:{run}"


def cut3r_size(video: Path, long_side: int) -> tuple[int, int]:
    """(height, width) of the CUT3R input this video gives."""
    from loc3r.runtime.preprocess import cut3r_input
    from loc3r.runtime.video import iter_frames

    frame = next(iter(iter_frames(video, 1)))
    height, width = cut3r_input(frame.rgb, long_side).shape[-2:]
    return int(height), int(width)


def assemble(
    args: argparse.Namespace,
    command: str,
    machine: dict[str, Any],
    config: Loc3rConfig,
    runs: dict[str, list[dict[str, float]]],
    memory: dict[str, Any],
    frames_in_memory_mib: float,
    formats: dict[str, str],
    cut3r_input_size: tuple[int, int],
    repeat: int,
) -> dict[str, Any]:
    """The JSON document: stage summaries, ratios of medians against each baseline, memory,
    floor, provenance."""
    from loc3r.bench import baseline as baseline_module
    from loc3r.bench.measure import STAGES
    from loc3r.bench.stats import ratios, summarize_runs

    summaries = {name: summarize_runs(values) for name, values in runs.items()}

    def side(name: str, label: str, fmt: str) -> dict[str, Any]:
        summary = summaries[name]
        return {
            "label": label,
            "llm_format": fmt,
            "stages": {k: summary[k].to_dict() for k in STAGES},
            "decode_tokens_per_s": 1.0 / summary["decode_token"].median,
            "runs": runs[name],
        }

    baselines = {name: side(name, label, formats[name]) for name, label in BASELINES.items()}
    optimized = {name: side(name, f"loc3r {name}", formats[name]) for name in runs if name not in BASELINES}
    return {
        "command": command,
        "machine": machine,
        "model": model_description(args.model, config),
        "frames": args.frames,
        "repeat": repeat,
        "warmup": args.warmup,
        "decode_tokens": args.decode_tokens,
        "questions": list(QUESTIONS),
        "stage_descriptions": STAGES,
        "baseline_method": " ".join(baseline_module.__doc__.split()),
        "frames_in_memory_mib": frames_in_memory_mib,
        "cut3r_input": f"{cut3r_input_size[0]}x{cut3r_input_size[1]}",
        "baselines": baselines,
        "optimized": optimized,
        "ratios": {base: {name: ratios(summaries[base], summaries[name]) for name in optimized} for base in baselines},
        "ratio_definition": "baseline median / optimized median, per stage (> 1: optimized is faster)",
        "memory": memory,
        "floor": floor_reports(args.target or ["cpu"], config, args.frames, cut3r_input_size),
    }


def model_description(name: str, config: Loc3rConfig) -> dict[str, Any]:
    """Model id, random-weights flag and every size (the preset's, for ``small``)."""
    from loc3r.models.vision import vision_tokens_per_frame

    return {
        "name": str(name),
        "model_id": config.model_id,
        "random_weights": config.random_weights,
        "vision_tokens_per_frame": vision_tokens_per_frame(config),
        "config": config.to_dict(),
    }


def floor_reports(targets: Sequence[str], config: Loc3rConfig, frames: int, cut3r_input_size: tuple[int, int]) -> list[dict[str, Any]]:
    """``loc3r.bench.floor`` reports of the benchmarked model's sizes on ``targets``."""
    from loc3r.bench.floor import ModelSizes, Workload, floor_report
    from loc3r.bench.flops import Cut3rSizes
    from loc3r.models.cut3r import Cut3rConfig
    from loc3r.models.vision import used_vision_layers, vision_tokens_per_frame

    height, width = cut3r_input_size
    sizes = ModelSizes(
        vision=config.vision,
        llm=config.llm,
        cut3r=Cut3rSizes(config=Cut3rConfig.from_dict(config.cut3r), height=height, width=width),
        heads=config.heads,
        vision_layers_used=used_vision_layers(config.vision, config.vision_select_layer),
    )
    work = Workload(frames=frames, tokens_per_frame=1 + vision_tokens_per_frame(config))
    return [floor_report(target, work, sizes) for target in targets]


def write_outputs(doc: dict[str, Any], args: argparse.Namespace) -> str:
    """JSON, markdown and plot where asked (atomically); the markdown text."""
    from loc3r.bench.fresh import render_fresh
    from loc3r.bench.report import render_markdown, write_plot
    from loc3r.fileio import atomic_file, write_json_atomic

    text = render_fresh(doc) if "fresh_process" in doc else render_markdown(doc)
    for path in (args.json, args.markdown, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        write_json_atomic(args.json, doc)
    if args.markdown:
        with atomic_file(args.markdown) as stream:
            stream.write(text)
    if args.plot and "fresh_process" not in doc:
        write_plot(doc, args.plot, parse_plot_size(args.plot_size))
    return text


def recording_for(args: argparse.Namespace, argv: Sequence[str]) -> Recording:
    """The provenance record of this run, named after its ``--json`` (else ``--markdown``)
    file. Only a result written into ``benchmarks/results`` must come from code on main; a
    user's own run elsewhere is recorded as it is (the record says when it is not on main)."""
    from loc3r.bench.provenance import Recording, outside_results

    outputs = [Path(p) for p in (args.json, args.markdown, args.plot) if p]
    stem = outputs[0].stem if outputs else PROG
    interleaving = ("sides in turn, each a fresh process, the order reversed every round (A B, B A, ...)" if args.fresh_process
                    else "baselines and optimized runs alternate which goes first (A B, B A, ...)")
    repeat = args.repeat or DEFAULT_REPEAT.get(str(args.model), 2)
    return Recording(stem, [PROG, *argv], interleaving, repeat, args.allow_unreachable or outside_results(*outputs))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = bench_parser().parse_args(argv)

    def body() -> int:
        check_args(args)
        recording = recording_for(args, argv)
        doc = (run_fresh_bench if args.fresh_process else run_bench)(args, shlex.join([PROG, *argv]))
        doc["provenance"] = recording.finish()
        print(write_outputs(doc, args))
        return 0

    return run_cli(PROG, body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
