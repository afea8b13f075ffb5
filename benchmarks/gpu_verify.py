"""The GPU verification a maintainer with a GPU runs first (``benchmarks/gpu_verify.sh``,
under 10 minutes on one GPU): each GPU path loc3r has, run for real on the tiny model, one
table. A missing piece (no GPU, no TensorRT, no CUDA provider, no LLM builder) is a row
saying ``skipped: why``, never a crash; a check that runs and disagrees is ``FAIL``.

Rows: cuda-python as ``runtime/cuda.py`` calls it (buffers, copies, graph capture and
replay); the CUDA driver against the runtime; TensorRT engines built from a tiny export
strongly typed and pinned (the 10.x fallback), each checked against ONNX Runtime FP32;
``loc3r-run``'s three backends at 16:9 and 9:16 against the torch answer; the int4
GroupQueryAttention decoder on the CUDA provider (KV bound past = present) against the CPU
form; ``--backend onnxruntime`` with and without ``import tensorrt`` first. Exit 1 when a
row fails. All numbers come from random tiny weights: they check the paths, not a model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROG = "gpu_verify"
FRAMES = 10
ASPECTS = {"16:9": (320, 180), "9:16": (180, 320)}
POSE_TOLERANCE_M = 0.05  # FP16 engines against the FP32 torch answer, metres
SKIP = "skipped"


class Skip(Exception):
    """A piece this check needs is missing: the row says which."""


@dataclass(frozen=True)
class Row:
    check: str
    status: str  # "ok", "FAIL" or "skipped"
    detail: str


@dataclass
class Context:
    """What the checks share: a work folder, the exports and videos made once."""

    work: Path
    built: Path | None = None  # the strongly typed engines, once built
    _export: Path | None = None
    _videos: dict[str, Path] | None = None

    def export(self) -> Path:
        """The tiny model exported for a GPU target (no LLM: the decoder has its own row)."""
        if self._export is None:
            from loc3r.export import cli as export_cli

            out = self.work / "export"
            if export_cli.main(["--model", "tiny", "--target", "x86-cuda", "--out", str(out), "--llm", "none"]) != 0:
                raise RuntimeError("loc3r-export of the tiny model failed (see above)")
            self._export = out
        return self._export

    def fresh_export(self, name: str) -> Path:
        return Path(shutil.copytree(self.export(), self.work / name))

    def videos(self) -> dict[str, Path]:
        if self._videos is None:
            from loc3r.runtime.demo_video import write_demo_video

            self._videos = {a: write_demo_video(self.work / f"{a.replace(':', 'x')}.mp4", num_frames=16, width=w, height=h) for a, (w, h) in ASPECTS.items()}
        return self._videos


# -- what is here ----------------------------------------------------------------------------


def need_gpu() -> Any:
    from loc3r.errors import Loc3rError
    from loc3r.runtime.cuda import gpu_info, import_cudart

    try:
        import_cudart()
        return gpu_info()
    except Loc3rError as exc:
        raise Skip(exc.problem) from None


def need_tensorrt() -> Any:
    need_gpu()
    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("TensorRT is not installed (x86: pip install -e '.[tensorrt]'; Jetson: JetPack's python3-libnvinfer)")
    import tensorrt

    return tensorrt


def need_cuda_provider() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Skip(f"this onnxruntime has no CUDA provider ({', '.join(onnxruntime.get_available_providers())})")


# -- the checks ------------------------------------------------------------------------------


def check_cuda_python(ctx: Context) -> list[Row]:
    """Device buffers, host/device copies, a captured device copy replayed from a CUDA graph."""
    gpu = need_gpu()
    from loc3r.runtime.cuda import Device

    device = Device()
    try:
        data = np.arange(1 << 16, dtype=np.float32)
        src, dst = device.alloc(data.nbytes), device.alloc(data.nbytes)
        device.upload(src, data)
        with device.capture() as graph:
            device.copy(dst, src, data.nbytes)
        for _ in range(3):
            device.launch(graph[0])
        back = np.zeros_like(data)
        device.download(back, dst)
        device.synchronize()
    finally:
        device.close()
    ok = np.array_equal(back, data)
    return [Row("cuda-python: buffers, copies, graph capture + replay", "ok" if ok else "FAIL", f"{gpu.name} sm_{gpu.sm}: {'replayed copy matches' if ok else 'replayed copy differs'}")]


def check_driver(ctx: Context) -> list[Row]:
    from loc3r.engines.install_rules import driver_runs
    from loc3r.runtime.cuda import driver_cuda_version, runtime_cuda_version
    from loc3r.runtime.doctor import jetson_release

    need_gpu()
    driver, runtime = driver_cuda_version(), runtime_cuda_version()
    if driver is None or runtime is None:
        raise Skip("libcuda or cuda-python does not report a version")
    jetson = jetson_release() is not None  # no CUDA minor-version compatibility there
    ok = driver_runs(driver, runtime, minor_compat=not jetson)
    return [Row("CUDA driver vs cuda-python's runtime", "ok" if ok else "FAIL", f"driver CUDA {driver[0]}.{driver[1]}, runtime {runtime[0]}.{runtime[1]}{', Jetson' if jetson else ''}")]


def check_engine_builds(ctx: Context) -> list[Row]:
    """The tiny export's engines, strongly typed and pinned, each checked against ONNX Runtime FP32."""
    trt = need_tensorrt()
    from loc3r.errors import Loc3rError
    from loc3r.export.device_build import build_from_manifest
    from loc3r.export.tensorrt_build import NO_WEAK_TYPING_FROM, PrecisionMode, version_tuple

    rows = []
    modes = [PrecisionMode.FP16_STRONG]
    if version_tuple(trt.__version__) < NO_WEAK_TYPING_FROM:
        modes.append(PrecisionMode.FP16_WEAK)
    else:
        rows.append(Row(f"engine build {PrecisionMode.FP16_WEAK}", SKIP, f"TensorRT {trt.__version__} has no weak typing"))
    for mode in modes:
        folder = ctx.fresh_export(f"engines-{mode}")
        started = time.perf_counter()
        try:
            manifest = build_from_manifest(folder, progress=lambda m: None, mode=mode)
        except Loc3rError as exc:
            rows.append(Row(f"engine build {mode}", "FAIL", str(exc)))
            continue
        checks = manifest.data["engines"]["check_vs_onnxruntime_fp32"]
        worst = max(checks.items(), key=lambda kv: kv[1]["relative"])
        rows.append(Row(f"engine build {mode} (TensorRT {trt.__version__})", "ok", f"{len(checks)} engines in {time.perf_counter() - started:.0f} s; worst vs ONNX Runtime FP32: {worst[0]} {worst[1]['relative']:.2e} of scale"))
        if mode == PrecisionMode.FP16_STRONG:
            ctx.built = folder
    return rows


def check_backends(ctx: Context) -> list[Row]:
    """loc3r-run's backends at 16:9 and 9:16, each against the torch answer."""
    from loc3r.runtime.generate import SamplingConfig
    from loc3r.runtime.pipeline import Pipeline

    sampling = SamplingConfig(max_new_tokens=6)
    videos = ctx.videos()
    reference = Pipeline.from_pretrained("tiny")
    want = {a: reference.ask(v, "Where am I?", num_frames=FRAMES, sampling=sampling) for a, v in videos.items()}
    rows = [Row(f"loc3r-run --backend torch {a}", "ok", f"pose ({w.pose.x:.3f}, {w.pose.y:.3f}) m, {len(w.token_ids)} tokens (the reference)") for a, w in want.items()]
    for backend in ("onnxruntime", "tensorrt"):
        try:
            if backend == "tensorrt":
                need_tensorrt()
                engines = ctx.built
                if engines is None:
                    raise Skip("no engines were built (see the engine rows)")
            else:
                need_gpu()
                need_cuda_provider()
                engines = ctx.fresh_export("ort-gpu")
            pipeline = Pipeline.from_pretrained("tiny", backend=backend, engines=engines)
        except Skip as why:
            rows += [Row(f"loc3r-run --backend {backend} {a}", SKIP, str(why)) for a in videos]
            continue
        for aspect, video in videos.items():
            got = pipeline.ask(video, "Where am I?", num_frames=FRAMES, sampling=sampling)
            diff = max(abs(getattr(got.pose, f) - getattr(want[aspect].pose, f)) for f in ("x", "y"))
            same = got.token_ids == want[aspect].token_ids
            status = "ok" if diff <= POSE_TOLERANCE_M else "FAIL"
            rows.append(Row(f"loc3r-run --backend {backend} {aspect}", status, f"pose vs torch {diff:.2e} m (tolerance {POSE_TOLERANCE_M}); tokens {'equal' if same else 'differ'}"))
    return rows


def check_int4_decoder(ctx: Context) -> list[Row]:
    """The int4 GroupQueryAttention decoder (cuda form) on the CUDA provider against the cpu form."""
    need_gpu()
    need_cuda_provider()
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise Skip("onnxruntime-genai (the LLM builder) is not installed here: pip install -e '.[export-cuda]' or use loc3r-export --builder-python")
    import torch

    from loc3r.bench.llm_quant import TINY, peaked_qwen2
    from loc3r.export.llm import LLMForm, LLMSource, export_llm
    from loc3r.export.llm_io import DECODER, EMBEDDINGS
    from loc3r.runtime.onnx_llm import OnnxLLM

    model = peaked_qwen2(TINY, steps=40, lr=1e-2, batch=8, length=24)
    source = LLMSource.from_model(model, ctx.work / "llm-source")
    tokens = {}
    for name, form, providers in (("cuda", LLMForm("cuda", "int4", "int4"), ["CUDAExecutionProvider"]), ("cpu", LLMForm("cpu", "int4", "int4", accuracy_level=4), ["CPUExecutionProvider"])):
        folder = ctx.work / f"llm-{name}"
        export_llm(source, folder, form, 64, 16)
        llm = OnnxLLM(folder / DECODER, folder / EMBEDDINGS, capacity=64, chunk_tokens=16, providers=providers)
        logits = llm.prefill(llm.embed(list(range(12)))).last_logits
        out = [int(torch.argmax(logits))]
        for _ in range(11):
            out.append(int(torch.argmax(llm.decode(out[-1]))))
        tokens[name] = out
    agree = sum(a == b for a, b in zip(tokens["cuda"], tokens["cpu"])) / len(tokens["cpu"])
    return [Row("int4 GQA decoder, CUDA provider vs CPU", "ok" if agree >= 0.9 else "FAIL", f"greedy top-1 agreement {agree:.0%} over 12 tokens (KV bound past = present)")]


_OPEN_ORT = """
import json, sys
{first}
from loc3r.runtime.pipeline import Pipeline
pipeline = Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=sys.argv[1])
print(json.dumps(pipeline.stages.vision.session.get_providers()))
"""


def check_import_tensorrt_first(ctx: Context) -> list[Row]:
    """--backend onnxruntime in fresh processes, with and without ``import tensorrt`` first
    (which puts pip TensorRT's libnvinfer in the process for the TensorRT provider)."""
    need_gpu()
    need_cuda_provider()
    rows = []
    for label, first in (("without import tensorrt", ""), ("with import tensorrt first", "import tensorrt")):
        if first and importlib.util.find_spec("tensorrt") is None:
            rows.append(Row(f"--backend onnxruntime {label}", SKIP, "TensorRT is not installed"))
            continue
        folder = ctx.fresh_export(f"ort-{len(rows)}")
        done = subprocess.run([sys.executable, "-c", _OPEN_ORT.format(first=first), str(folder)], capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            rows.append(Row(f"--backend onnxruntime {label}", "FAIL", (done.stderr.strip().splitlines() or ["no output"])[-1]))
            continue
        providers = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(Row(f"--backend onnxruntime {label}", "ok", "vision on " + ", ".join(p.removesuffix("ExecutionProvider") for p in providers)))
    return rows


CHECKS: Sequence[tuple[str, Callable[[Context], list[Row]]]] = (
    ("cuda-python: buffers, copies, graph capture + replay", check_cuda_python),
    ("CUDA driver vs cuda-python's runtime", check_driver),
    ("engine builds (strongly typed, pinned)", check_engine_builds),
    ("loc3r-run backends at 16:9 and 9:16", check_backends),
    ("int4 GQA decoder, CUDA provider vs CPU", check_int4_decoder),
    ("--backend onnxruntime and import tensorrt", check_import_tensorrt_first),
)


def run_checks(ctx: Context, checks: Sequence[tuple[str, Callable[[Context], list[Row]]]] = CHECKS) -> list[Row]:
    """Every check; a missing piece is a skipped row, an unexpected error a FAIL row."""
    rows: list[Row] = []
    for name, check in checks:
        try:
            rows += check(ctx)
        except Skip as why:
            rows.append(Row(name, SKIP, str(why)))
        except Exception as exc:  # noqa: BLE001 - one row per check, never a crash
            last = traceback.extract_tb(exc.__traceback__)[-1]
            rows.append(Row(name, "FAIL", f"{type(exc).__name__}: {exc} ({Path(last.filename).name}:{last.lineno})"))
    return rows


def table(rows: Sequence[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  {'status':<7}  detail", f"{'-' * width}  {'-' * 7}  {'-' * 6}"]
    lines += [f"{r.check:<{width}}  {r.status:<7}  {r.detail}" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="keep the exports and videos in this folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loc3r-gpu-verify-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run_checks(Context(work))
    print(table(rows))
    print("(tiny random weights: these rows check the GPU paths, not a trained model)")
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
