"""Export a bundle for a target: ONNX graphs with measured parity, the LLM, the manifest.

Everything is written into a staging folder that replaces ``out_dir`` only when the
whole export succeeded, so an interrupted or failing export leaves nothing half-written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loc3r.engines.targets import Target
from loc3r.export import graphs
from loc3r.export.manifest import FORMAT, MANIFEST_FILE, VERSION, Manifest, load_manifest
from loc3r.export.camera_parity import CameraRunner, SessionRunner, TorchRunner, fixed_images, run_recurrence
from loc3r.export.precision import FP16_SUFFIX, ScaledError, merge_scaled, scaled_error, write_fp16
from loc3r.export.onnx_export import (
    OPSET,
    ParityResult,
    check_parity,
    compare,
    ensure_within,
    export_onnx,
    merge,
    paired_runs,
    quiet_exporter,
)
from loc3r.export.tensorrt_build import device_build_plan
from loc3r.runtime.ort import open_session
from loc3r.errors import InternalError
from loc3r.fileio import atomic_directory, current_umask, write_json_atomic
from loc3r.models.bundle import Bundle
from loc3r.models.cut3r import Cut3rState

CUT3R_INIT_FILE = "cut3r_init.safetensors"
RECURRENCE_FRAMES = 8

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportRequest:
    """What to export: the bundle, the target and the LLM format."""

    bundle: Bundle
    target: Target
    out_dir: Path
    llm_quant: str | None  # None: leave the LLM out (the runtime then uses the bundle's)

    @property
    def cut3r_sizes(self) -> graphs.ImageSizes:
        """The CUT3R input sizes the graphs serve (the model's long side, any aspect up to 4:1)."""
        return graphs.ImageSizes.for_model(self.bundle.config.cut3r_long_side, self.bundle.model.camera_encoder.config.patch_size)

    @property
    def fp16(self) -> bool:
        """FP16 targets also get FP16 graphs (strongly typed TensorRT builds), checked here."""
        return self.target.build.precision == "fp16"


def export_all(request: ExportRequest, progress: Progress = print) -> Manifest:
    """Write every artifact and ``manifest.json`` into ``request.out_dir`` atomically."""
    bundle = request.bundle
    with atomic_directory(request.out_dir) as staging:
        artifacts: dict[str, Any] = {}
        for name, export in (
            ("cut3r", export_camera),
            ("vision", export_vision),
            ("heads", export_heads),
        ):
            progress(f"exporting {name} ...")
            artifacts.update(export(request, staging))
        llm = None
        if request.llm_quant:
            from loc3r.export.llm import export_llm

            progress(f"exporting the LLM ({request.llm_quant}) ...")
            plan = request.target.llm
            same_as_target = request.llm_quant == plan.weights
            with quiet_exporter():
                llm = export_llm(
                    bundle.model.llm,
                    staging / "llm",
                    request.llm_quant,
                    block_size=plan.block_size or 32,
                    lm_head=plan.lm_head if same_as_target else None,
                )
        manifest = build_manifest(request, artifacts, llm)
        write_json_atomic(staging / MANIFEST_FILE, manifest)
    return load_manifest(request.out_dir)


def build_manifest(request: ExportRequest, artifacts: dict[str, Any], llm: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest: model identity, target, precision, artifacts, LLM, build steps, versions."""
    target = request.target
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "id": request.bundle.config.model_id,
            "checksum": request.bundle.checksum,
            "random_weights": request.bundle.config.random_weights,
            "llm_width": request.bundle.config.llm.hidden_size,
        },
        "target": {"name": target.name, "description": target.description, "backends": list(target.backends)},
        "precision": target.build.precision,
        "opset": OPSET,
        "cut3r_input": request.cut3r_sizes.to_dict(),
        "artifacts": artifacts,
        "llm": llm,
        "tools": tool_versions(),
    }
    manifest["device_build"] = device_build_plan(manifest, target)
    return manifest


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_entry(spec: graphs.GraphSpec, path: Path, parity: ParityResult, **extra: Any) -> dict[str, Any]:
    return {"file": path.name, "sha256": file_sha256(path), **spec.to_dict(), "parity": parity.to_dict(), **extra}


# -- CUT3R -------------------------------------------------------------------------------


def export_camera(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``cut3r_encoder`` (ViT, any frame count and size) and ``cut3r_step`` (decoder, memory,
    f_cam), checked over an 8-frame recurrence at 4:3, 16:9, 9:16 and 1:1."""
    model = request.bundle.model
    config = model.camera_encoder.config
    with torch.no_grad():
        init = model.camera_encoder.init_state(1)
    init = Cut3rState(init.state_feat.detach().contiguous(), init.memory.detach().contiguous())
    encoder = graphs.CameraEncoderGraph(model.camera_encoder)
    step = graphs.CameraStepGraph(model.camera_encoder, model.heads)
    specs = (
        graphs.camera_encoder_spec(config.enc_embed_dim, config.patch_size),
        graphs.camera_step_spec(
            config.enc_embed_dim, tuple(init.state_feat.shape[1:]), tuple(init.memory.shape[1:]), request.bundle.config.llm.hidden_size
        ),
    )
    images = torch.from_numpy(fixed_images(2, request.cut3r_sizes.aspect(3, 4), seed=5))
    with torch.no_grad():
        features, positions = encoder(images)
    paths = (
        export_onnx(encoder, specs[0], (images,), out / "cut3r_encoder.onnx"),
        export_onnx(step, specs[1], (features[:1], positions, init.state_feat, init.memory, torch.ones(1)), out / "cut3r_step.onnx"),
    )
    save_file({"state": init.state_feat, "memory": init.memory}, str(out / CUT3R_INIT_FILE))
    os.chmod(out / CUT3R_INIT_FILE, 0o666 & ~current_umask())  # safetensors writes 0600
    runners = [TorchRunner(encoder, step), SessionRunner(*(open_session(p) for p in paths))]
    if request.fp16:
        runners.append(SessionRunner(*(open_session(write_fp16(p, s)) for p, s in zip(paths, specs))))
    checks = {}
    for ratio in graphs.PARITY_ASPECTS.values():
        height, width = request.cut3r_sizes.aspect(*ratio)
        checks[f"{height}x{width}"] = camera_checks(runners, specs, init, (height, width))
    entries = {}
    for spec, path in zip(specs, paths):
        parity = ensure_within(spec, merge([check[spec.name].parity for check in checks.values()]))
        by_aspect = {
            label: {"size": size, **check[spec.name].parity.to_dict()}
            for label, (size, check) in zip(graphs.PARITY_ASPECTS, checks.items())
        }
        extra: dict[str, Any] = {"parity_by_aspect": by_aspect}
        if request.fp16:
            extra["fp16"] = fp16_entry(spec, path, [check[spec.name].fp16 for check in checks.values()])
        entries[spec.name] = artifact_entry(spec, path, parity, **extra)
    entries["cut3r_step"]["initial_state"] = CUT3R_INIT_FILE
    return entries


@dataclass(frozen=True)
class GraphCheck:
    """One graph's ONNX Runtime parity with PyTorch, and its FP16 graph's error (FP16 targets)."""

    parity: ParityResult
    fp16: ScaledError | None


def camera_checks(
    runners: list[CameraRunner], specs: tuple[graphs.GraphSpec, graphs.GraphSpec], init: Cut3rState, size: tuple[int, int]
) -> dict[str, GraphCheck]:
    """The encoder's and the step's checks over one recurrence at ``size``: runners are
    PyTorch (the reference), ONNX Runtime FP32 and, for FP16 targets, the FP16 graphs."""
    images = fixed_images(RECURRENCE_FRAMES, size)
    reference, exported, *fp16 = (run_recurrence(r, images, init.state_feat.numpy(), init.memory.numpy()) for r in runners)
    encoder, step = specs
    checks = {
        encoder.name: GraphCheck(compare(encoder, reference.encoded, exported.encoded), None),
        step.name: GraphCheck(merge([compare(step, want, got) for want, got in zip(reference.steps, exported.steps, strict=True)]), None),
    }
    if fp16:
        checks[encoder.name] = GraphCheck(checks[encoder.name].parity, scaled_error(reference.encoded, fp16[0].encoded, encoder.fp16_tolerance))
        errors = [scaled_error(want, got, step.fp16_tolerance) for want, got in zip(reference.steps, fp16[0].steps, strict=True)]
        checks[step.name] = GraphCheck(checks[step.name].parity, merge_scaled(errors))
    return checks


def fp16_entry(spec: graphs.GraphSpec, path: Path, errors: list[ScaledError]) -> dict[str, Any]:
    """The FP16 graph's file and its error against PyTorch FP32 (ONNX Runtime CPU); an FP16
    graph past the graph's tolerance fails the export (its engines would fail the build)."""
    error = merge_scaled(errors)
    if not error.within_tolerance:
        raise InternalError(
            f"{spec.name}: the FP16 graph is {error.relative:.3g} of the output scale away from FP32 "
            f"(tolerance {spec.fp16_tolerance:g})",
            "export for an fp32 target, or report it with --debug",
        )
    fp16_path = path.with_name(path.name.removesuffix(".onnx") + FP16_SUFFIX)
    return {"file": fp16_path.name, "sha256": file_sha256(fp16_path), "error_vs_fp32": error.to_dict()}


# -- vision and heads ----------------------------------------------------------------------


def export_vision(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``vision``: frames -> pooled, projected tokens with row newlines (frames axis dynamic)."""
    config = request.bundle.config
    module = graphs.VisionGraph(request.bundle.model.vision)
    spec = graphs.vision_spec(config.vision.image_size, module.vision.tokens_per_frame, config.llm.hidden_size)
    generator = torch.Generator().manual_seed(7)
    path = export_onnx(module, spec, graphs.random_inputs(spec, generator, {"frames": 2}), out / "vision.onnx")
    inputs = sized_inputs(spec, generator, "frames", 1)
    parity = check_parity(module, spec, path, inputs)
    return {"vision": artifact_entry(spec, path, parity, **fp16_variant(request, module, spec, path, inputs))}


def export_heads(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``pose_head`` (f_pos, f_ori + soft-argmax) and ``bev_head`` (f_bev)."""
    heads = request.bundle.model.heads
    width = request.bundle.config.llm.hidden_size
    generator = torch.Generator().manual_seed(11)
    entries = {}
    for module, spec, axis in (
        (graphs.PoseHeadGraph(heads), graphs.pose_head_spec(width), "batch"),
        (graphs.BevHeadGraph(heads), graphs.bev_head_spec(width), "tokens"),
    ):
        path = export_onnx(module, spec, graphs.random_inputs(spec, generator, {axis: 2}), out / f"{spec.name}.onnx")
        inputs = sized_inputs(spec, generator, axis, 3)
        parity = check_parity(module, spec, path, inputs)
        entries[spec.name] = artifact_entry(spec, path, parity, **fp16_variant(request, module, spec, path, inputs))
    return entries


def sized_inputs(spec: graphs.GraphSpec, generator: torch.Generator, axis: str, step: int) -> Callable[[int], tuple]:
    """Fresh random inputs for run 0, 1, ... whose dynamic ``axis`` is 1 + step * run."""
    return lambda run: graphs.random_inputs(spec, generator, {axis: 1 + step * run})


def fp16_variant(
    request: ExportRequest, module: torch.nn.Module, spec: graphs.GraphSpec, path: Path, make_inputs: Callable[[int], tuple], runs: int = 3
) -> dict[str, Any]:
    """For FP16 targets, ``{"fp16": ...}``: the FP16 graph checked against PyTorch on fresh inputs."""
    if not request.fp16:
        return {}
    pairs = paired_runs(module, spec, open_session(write_fp16(path, spec)), make_inputs, runs)
    errors = [scaled_error([t.numpy() for t in expected], actual, spec.fp16_tolerance) for expected, actual in pairs]
    return {"fp16": fp16_entry(spec, path, errors)}
