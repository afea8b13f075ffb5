"""``loc3r-export build --manifest``: build the TensorRT engines a manifest plans, on the device,
then check each against ONNX Runtime FP32 on fixed inputs before recording it.

The check runs the engines through the runtime's own sessions (``TrtSession``), CUT3R over
an 8-frame recurrence at 16:9 and 9:16 (one per optimisation profile), and records each
graph's error relative to its output scale in the manifest; past the graph's tolerance the
build fails and leaves no engine behind.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loc3r.errors import InputError, ModelError
from loc3r.export.camera_parity import fixed_images, run_recurrence
from loc3r.export.graphs import ImageSizes
from loc3r.export.qdq import QDQ_FORM
from loc3r.export.manifest import MANIFEST_FILE, Manifest, contained, load_manifest, write_manifest
from loc3r.export.precision import ScaledError, fp32_tensor_names, merge_scaled, scaled_error
from loc3r.export.tensorrt_build import (
    TIMING_CACHE,
    BuildRequest,
    PrecisionMode,
    Profile,
    build_engine,
    engine_file_name,
    fallback_mode,
    import_tensorrt,
    precision_mode,
)
from loc3r.fileio import atomic_file, claim_entries
from loc3r.runtime.cuda import gpu_info

Progress = Callable[[str], None]
#: aspect ratios the engine check runs CUT3R at: one inside each optimisation profile
CHECK_ASPECTS = {"16:9": (9, 16), "9:16": (16, 9)}
CHECK_FRAMES = 8
GRAPH_NAME = re.compile(r"[a-z0-9_]+")  # what the exporter names its graphs (and engine files after them)


def build_from_manifest(manifest_path: str | Path, progress: Progress = print, precision: str | None = None, mode: str | None = None) -> Manifest:
    """Build every planned engine next to the manifest (whose files are verified first),
    check it, and record it there, hashed like every other artifact. FP16 is built strongly
    typed first, pinned if that fails to build or to pass the check; ``mode`` forces one."""
    path = Path(manifest_path)
    manifest = load_manifest(path.parent if path.name == MANIFEST_FILE else path)
    manifest.verify()
    plan = manifest.data.get("device_build")
    if not plan:
        raise InputError(
            f"{manifest.path} plans no TensorRT engines (target {manifest.data['target'].get('name')})",
            "export for a TensorRT target, e.g. loc3r-export --target jetson-orin",
        )
    planned = {name: manifest.value("device_build", "engines", name, "profiles", kind=list) for name in manifest.value("device_build", "engines", kind=dict)}
    for name in planned:  # every name and path is checked before TensorRT is imported
        if not GRAPH_NAME.fullmatch(name) or name not in manifest.artifacts:
            raise ModelError(f"{manifest.path} plans an engine for {name!r}, which is not one of its graphs", "re-run loc3r-export")
        manifest.artifact_path(name)
    trt = import_tensorrt()
    gpu = gpu_info()
    precision = precision or plan["precision"]
    fallback = None if mode else fallback_mode(trt.__version__, precision_mode(trt.__version__, precision))
    mode = mode or precision_mode(trt.__version__, precision)
    progress(f"TensorRT {trt.__version__} on {gpu.name} (sm_{gpu.sm}): {precision}, {mode}" + (f" (fallback: {fallback})" if fallback else ""))
    if gpu.sm != plan["sm"]:
        progress(f"note: the export planned sm_{plan['sm']} ({manifest.data['target']['name']}); these engines are for sm_{gpu.sm}")
    try:
        built, checks = build_and_check(manifest, planned, plan, trt, gpu.sm, precision, mode, progress)
    except ModelError as exc:
        if fallback is None:
            raise
        progress(f"{mode} failed ({exc.problem}); building {fallback} instead")
        mode = fallback
        built, checks = build_and_check(manifest, planned, plan, trt, gpu.sm, precision, mode, progress)
    data = dict(manifest.data)
    data["engines"] = {
        "trt_version": trt.__version__,
        "sm": gpu.sm,
        "gpu": gpu.name,
        "precision": precision,
        "mode": mode,
        "files": built,
        "check_vs_onnxruntime_fp32": {name: error.to_dict() for name, error in checks.items()},
    }
    data["device_build"] = {**plan, "status": "built"}
    data["files"] = {k: v for k, v in manifest.files.items() if k not in built.values()}  # rebuilt: hashed anew
    claim_entries(manifest.root, built.values())
    write_manifest(manifest.root, data)
    return load_manifest(manifest.root)


def build_and_check(
    manifest: Manifest, planned: dict[str, list[Any]], plan: dict[str, Any], trt: Any, sm: str, precision: str, mode: str, progress: Progress
) -> tuple[dict[str, str], dict[str, ScaledError]]:
    """Build every engine in ``mode`` and check it; on any failure no engine is left behind."""
    built: dict[str, str] = {}
    try:
        for name, profiles in planned.items():
            request = build_request(manifest, name, profiles, mode, engine_file_name(name, trt.__version__, sm), plan)
            progress(f"building {request.engine_file.name} ...")
            plan_bytes = build_engine(trt, request)
            with atomic_file(request.engine_file, "wb") as stream:
                stream.write(plan_bytes)
            built[name] = request.engine_file.name
        progress("checking the engines against ONNX Runtime FP32 ...")
        checks = check_engines(manifest, built)
        failed = {name: error for name, error in checks.items() if not error.within_tolerance}
        if failed:
            name, error = next(iter(failed.items()))
            raise ModelError(
                f"the {precision} engine {built.get(name, name)} is {error.relative:.3g} of its output scale away from "
                f"ONNX Runtime FP32 (tolerance {error.tolerance:g})",
                f"rebuild in FP32: loc3r-export build --precision fp32 --manifest {manifest.root / MANIFEST_FILE}",
            )
    except BaseException:
        for file in built.values():
            with contextlib.suppress(FileNotFoundError):
                (manifest.root / file).unlink()
        raise
    return built, checks


def build_request(manifest: Manifest, name: str, profiles: list[dict[str, Any]], mode: str, engine: str, plan: dict[str, Any]) -> BuildRequest:
    """What to build for one graph in ``mode``: the FP16 graph for strong typing, the FP32
    graph (with its FP32 pins for weak typing) otherwise."""
    artifact = manifest.artifacts[name]
    if mode == PrecisionMode.FP16_STRONG and "fp16" not in artifact:
        raise ModelError(f"{manifest.root} has no FP16 graph for {name}", "export for an fp16 target, or build with --precision fp32")
    onnx_file = manifest.file(manifest.value("artifacts", name, "fp16", "file") if mode == PrecisionMode.FP16_STRONG else artifact["file"])
    if calibrated_int8(manifest, name):  # explicit quantization: the QDQ graph, in either mode
        onnx_file = manifest.graph_file(name)
    try:
        shapes = [Profile.from_dict(p) for p in profiles]
    except (TypeError, ValueError, AttributeError):
        raise manifest.corrupt(f"the profiles of engine {name!r} are malformed") from None
    fp32_ops = tuple(artifact.get("fp32_ops", ()))
    weak = mode == PrecisionMode.FP16_WEAK
    return BuildRequest(
        onnx_file=onnx_file,
        engine_file=contained(manifest.root, engine, manifest.path),
        profiles=shapes,
        mode=mode,
        workspace_mib=plan["workspace_mib"] or 1024,
        timing_cache=manifest.root / TIMING_CACHE,
        fp32_ops=fp32_ops,
        fp32_tensors=fp32_tensor_names(onnx_file, fp32_ops, artifact.get("position_inputs", ())) if weak else frozenset(),
    )


# -- the check -------------------------------------------------------------------------------


def check_engines(manifest: Manifest, files: dict[str, str]) -> dict[str, ScaledError]:
    """Each engine against ONNX Runtime FP32 (CPU) on fixed inputs: CUT3R over a recurrence
    at 16:9 and 9:16, the rest on seeded random inputs. Errors relative to output scale.

    One graph at a time (CUT3R's encoder and step together): its engine, its device memory
    and its ONNX Runtime session are released before the next graph's are opened."""
    groups = [("cut3r_encoder", "cut3r_step")] if "cut3r_encoder" in files else []
    groups += [(name,) for name in sorted(files.keys() - {n for g in groups for n in g})]
    checks: dict[str, ScaledError] = {}
    for group in groups:
        checks.update(check_group(manifest, {name: files[name] for name in group}))
    return checks


def check_group(manifest: Manifest, files: dict[str, str]) -> dict[str, ScaledError]:
    """The engines of ``files`` (one graph, or CUT3R's pair) against their ONNX graphs."""
    from loc3r.runtime.cuda import Device
    from loc3r.runtime.ort import open_session
    from loc3r.runtime.tensorrt_backend import TrtSession, share_activation_memory

    trt = import_tensorrt()
    device = Device()
    try:
        engines = {name: TrtSession(trt, manifest.root / file, device) for name, file in files.items()}
        share_activation_memory(list(engines.values()), device)
        # a calibrated INT8 engine is checked against its QDQ graph (the same scales), at the INT8 tolerance
        references = {name: open_session(manifest.graph_file(name) if calibrated_int8(manifest, name) else manifest.artifact_path(name)) for name in files}
        if "cut3r_encoder" in files:
            return camera_checks(manifest, engines, references)
        (name,) = files
        feeds = fixed_feeds(engines[name].profiles[0], seed=len(name))
        want = references[name].run(None, feeds)
        got = engines[name].run(feeds)
        outputs = [spec["name"] for spec in manifest.artifacts[name]["outputs"]]
        return {name: scaled_error(want, [got[o] for o in outputs], tolerance(manifest, name))}
    finally:
        device.close()


def camera_checks(manifest: Manifest, engines: dict[str, Any], references: dict[str, Any]) -> dict[str, ScaledError]:
    """Encoder and step over an 8-frame recurrence at each ``CHECK_ASPECTS`` size."""
    from loc3r.export.camera_parity import SessionRunner
    from loc3r.runtime.onnx_backend import initial_state

    sizes = ImageSizes(**manifest.data["cut3r_input"])
    init = initial_state(manifest)
    engine_runner = EngineRunner(engines["cut3r_encoder"], engines["cut3r_step"], manifest)
    reference_runner = SessionRunner(references["cut3r_encoder"], references["cut3r_step"])
    encoder_errors, step_errors = [], []
    for ratio in CHECK_ASPECTS.values():
        images = fixed_images(CHECK_FRAMES, sizes.aspect(*ratio))
        want = run_recurrence(reference_runner, images, init["state"], init["memory"])
        got = run_recurrence(engine_runner, images, init["state"], init["memory"])
        encoder_errors.append(scaled_error(want.encoded, got.encoded, tolerance(manifest, "cut3r_encoder")))
        step_errors += [scaled_error(w, g, tolerance(manifest, "cut3r_step")) for w, g in zip(want.steps, got.steps, strict=True)]
    return {"cut3r_encoder": merge_scaled(encoder_errors), "cut3r_step": merge_scaled(step_errors)}


class EngineRunner:
    """The CUT3R engines as a ``CameraRunner`` (host arrays, in the manifest's output order)."""

    def __init__(self, encoder: Any, step: Any, manifest: Manifest) -> None:
        self.encoder, self.step_engine = encoder, step
        self.names = {name: [o["name"] for o in manifest.artifacts[name]["outputs"]] for name in ("cut3r_encoder", "cut3r_step")}
        self.step_inputs = [i["name"] for i in manifest.artifacts["cut3r_step"]["inputs"]]

    def encode(self, images: np.ndarray) -> list[np.ndarray]:
        out = self.encoder.run({"image": images})
        return [out[name] for name in self.names["cut3r_encoder"]]

    def step(self, *inputs: np.ndarray) -> list[np.ndarray]:
        out = self.step_engine.run(dict(zip(self.step_inputs, inputs, strict=True)))
        return [out[name] for name in self.names["cut3r_step"]]


def fixed_feeds(profile: Profile, seed: int, rows: int = 4) -> dict[str, np.ndarray]:
    """Seeded random inputs at a profile's optimal shapes, at most ``rows`` along axis 0."""
    generator = np.random.default_rng(seed)
    feeds = {}
    for name, (_, opt, _) in profile.shapes.items():
        shape = (min(opt[0], rows), *opt[1:]) if opt else opt
        feeds[name] = generator.standard_normal(shape).astype(np.float32)
    return feeds


def tolerance(manifest: Manifest, name: str) -> float:
    if calibrated_int8(manifest, name):
        return float(manifest.artifacts[name]["int8_tolerance"])
    return float(manifest.artifacts[name].get("fp16_tolerance", 2e-2))


def calibrated_int8(manifest: Manifest, name: str) -> bool:
    """The export's encoders are INT8 and graph ``name`` has a calibrated QDQ form
    (``export/qdq.py``): its engine is built from that graph (unverified on hardware)."""
    entry = manifest.artifacts[name].get("int8")
    return manifest.encoders == "int8" and isinstance(entry, dict) and entry.get("form") == QDQ_FORM
