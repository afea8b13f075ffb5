"""Export a bundle for a target: ONNX graphs with measured parity, the LLM, the manifest.

Everything is written into a staging folder that replaces ``out_dir`` only when the
whole export succeeded (``loc3r.fileio.atomic_directory``), so an interrupted or failing
export leaves nothing half-written; ``write_manifest`` lists and hashes every file in it.
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loc3r.engines.targets import Target
from loc3r.export import graphs
from loc3r.export.camera_parity import CameraRunner, SessionRunner, TorchRunner, fixed_images, run_recurrence
from loc3r.export.llm import PARITY_TOKENS, LLMForm, LLMSource, export_llm, llm_form
from loc3r.export.llm_io import LLM_DIR
from loc3r.export.manifest import EXPORT_KIND, FORMAT, MUTABLE_ENTRIES, VERSION, Manifest, load_manifest, write_manifest
from loc3r.export.memory_plan import MemoryPlan, Weights, check_fits, measured_weights, memory_plan, predicted_weights
from loc3r.export.int8 import INT8_GRAPHS, INT8_SUFFIX, write_int8
from loc3r.export.qdq import CalibrationSet, calibrate_cut3r, calibrate_vision
from loc3r.export.precision import FP16_SUFFIX, ScaledError, merge_scaled, scaled_error, write_fp16
from loc3r.export.onnx_export import (
    FUSED_ATTENTION_OPSET,
    OPSET,
    ParityResult,
    check_parity,
    compare,
    ensure_within,
    export_onnx,
    external_data_file,
    fused_attention_nodes,
    merge,
    paired_runs,
)
from loc3r.export.runtime_versions import runtime_minimums
from loc3r.export.tensorrt_build import device_build_plan
from loc3r.runtime.ort import open_session
from loc3r.errors import InternalError
from loc3r.fileio import atomic_directory
from loc3r.models.bundle import Bundle
from loc3r.models.loc3r_model import Loc3rModel
from loc3r.models.cut3r import Cut3rState
from loc3r.models.vision import vision_tokens_per_frame

CUT3R_INIT_FILE = "cut3r_init.safetensors"
VIDEO_END_FILE = "video_end.safetensors"  # tokens after the last frame: (k, width), k = 0 or 1
# CUT3R's export check: the whole recurrence at the aspect most video has, one carried state
# at the others, and the FP16 graphs (slow on ONNX Runtime's CPU provider) on their first
# frames: at 512x512 one ViT-L frame costs ~5 s per runtime on 2 cores (benchmarks/results/real_size.md).
RECURRENCE_FRAMES = 8
FULL_RECURRENCE_ASPECT = "16:9"
SHORT_RECURRENCE_FRAMES = 2
FP16_CHECK_FRAMES = 2

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportRequest:
    """What to export: the bundle, the target and the LLM format."""

    bundle: Bundle
    target: Target
    out_dir: Path
    llm_quant: str | None  # None: leave the LLM out (the runtime then uses the bundle's)
    vggt_size: tuple[int, int] | None = None  # (height, width) for a VGGT bundle; None: default_vggt_size
    context_tokens: int | None = None  # the LLM's context limit; None: the target's
    builder_python: str | None = None  # the Python that runs the LLM builder; None: this one
    encoders: str = "fp32"  # "int8": INT8 forms of the encoder graphs too, run by the onnxruntime backend
    calibration: CalibrationSet | None = None  # TensorRT targets' int8: the user's frames (QDQ graphs, ``export/qdq.py``)

    def parts(self, *names: str) -> Loc3rModel:
        """The bundle with only ``names`` loaded, in float32: each export loads what it traces
        and lets it go, so the peak is one graph's weights, never the whole model."""
        return self.bundle.load_parts(names, torch.float32)

    @property
    def context(self) -> int:
        """The context limit: asked for (or the target's), at most the model's."""
        asked = self.context_tokens or self.target.build.max_context_tokens
        return min(asked, self.bundle.config.llm.max_position_embeddings)

    @property
    def cut3r_sizes(self) -> graphs.ImageSizes:
        """The CUT3R input sizes the graphs serve (the model's long side, any aspect up to 4:1)."""
        from loc3r.models.cut3r import Cut3rConfig

        return graphs.ImageSizes.for_model(self.bundle.config.cut3r_long_side, Cut3rConfig.from_dict(self.bundle.config.cut3r).patch_size)

    @property
    def camera_size(self) -> tuple[int, int]:
        """The largest (height, width) the 3D encoder is fed: CUT3R's square frames at the
        model's long side, or the VGGT graph's fixed size."""
        if self.bundle.config.encoder_3d == "vggt":
            from loc3r.models.vggt import VggtConfig

            config = VggtConfig.from_dict(self.bundle.config.vggt)
            return self.vggt_size or default_vggt_size(config.img_size, config.patch_size)
        long_side = self.cut3r_sizes.long_side
        return long_side, long_side

    @property
    def int8(self) -> bool:
        """The encoder graphs also get dynamic INT8 forms (``export/int8.py``), checked here;
        with a calibration set, calibrated QDQ forms instead (``export/qdq.py``)."""
        return self.encoders == "int8" and self.calibration is None

    @property
    def opset(self) -> int:
        """The graphs' opset: ``FUSED_ATTENTION_OPSET`` (fused ``Attention`` nodes) for targets
        without TensorRT, ``OPSET`` for the rest. Each graph's parity against PyTorch is
        measured on the graph as written, fused attention included, and gates the export."""
        return OPSET if "tensorrt" in self.target.backends else FUSED_ATTENTION_OPSET

    @property
    def fp16(self) -> bool:
        """FP16 targets also get FP16 graphs (strongly typed TensorRT builds), checked here."""
        return self.target.build.precision == "fp16"


def default_vggt_size(img_size: int, patch: int) -> tuple[int, int]:
    """4:3 landscape as ``vggt_input`` makes it: width ``img_size``, height to the nearest patch (392x518)."""
    return round(img_size * 3 / 4 / patch) * patch, img_size


def export_all(request: ExportRequest, progress: Progress = print) -> Manifest:
    """Write every artifact and ``manifest.json`` into ``request.out_dir`` atomically.

    A target the model cannot fit is refused before anything is exported (memory plan
    predicted from the config) and again, from the written files, before the folder is
    put in place.
    """
    bundle = request.bundle
    form = llm_form(request.target, request.llm_quant) if request.llm_quant else None
    predicted = predicted_weights(bundle.config, request.target, form)
    check_plan(request, plan_of(request, predicted, form, "predicted from config.json"))
    with atomic_directory(request.out_dir, EXPORT_KIND, later=MUTABLE_ENTRIES) as staging:
        artifacts: dict[str, Any] = {}
        parts = (
            (bundle.config.encoder_3d, export_camera),
            ("vision", export_vision),
            ("heads", export_heads),
        )
        total = len(parts) + (form is not None)
        for number, (name, export) in enumerate(parts, start=1):
            progress(f"[{number}/{total}] exporting {name}: {what_is_checked(name, request)} ...")
            start = time.perf_counter()
            done = export(request, staging)
            artifacts.update(done)
            for entry in done.values():
                parity = entry["parity"]
                progress(f"      {entry['file']}: max abs {parity['max_abs']:.2e} vs PyTorch over {parity['runs']} run(s), within tolerance")
            progress(f"      {name} done in {time.perf_counter() - start:.1f} s")
        llm = None
        if form is not None:
            progress(
                f"[{total}/{total}] exporting the LLM ({request.llm_quant}, {form.provider} form) with onnxruntime-genai's "
                f"builder, then a {sum(PARITY_TOKENS)}-token probe against transformers' Qwen2 ..."
            )
            llm = export_llm(
                LLMSource.from_bundle(bundle),
                staging / LLM_DIR,
                form,
                request.context,
                request.target.llm.prefill_chunk,
                probe=True,
                builder_python=request.builder_python,
            )
        measured = plan_of(request, measured_weights(staging, artifacts, llm, request.target), form, "measured from the written files")
        check_plan(request, measured)
        manifest = build_manifest(request, artifacts, llm)
        manifest["runtime_minimums"] = runtime_minimums(staging, artifacts, llm, bool(manifest["device_build"]))
        manifest["memory_plan"] = measured.to_dict()
        manifest["memory_plan"]["predicted_weights"] = {n: w.disk for n, w in predicted.items()}
        write_manifest(staging, manifest)
    return load_manifest(request.out_dir)


def what_is_checked(name: str, request: ExportRequest) -> str:
    """What the export of part ``name`` checks, for its progress line."""
    fp16 = ", and the FP16 graphs" if request.fp16 else ""
    if name == "cut3r":
        aspects = ", ".join(graphs.PARITY_ASPECTS)
        return (
            f"encoder + recurrent step, ONNX Runtime vs PyTorch over {RECURRENCE_FRAMES} frames at {FULL_RECURRENCE_ASPECT} "
            f"and {SHORT_RECURRENCE_FRAMES} at each other aspect ({aspects}){fp16}"
        )
    if name == "vggt":
        return f"whole-clip encoder, ONNX Runtime vs PyTorch on clips of 2, 5 and 8 frames{fp16}"
    if name == "vision":
        return f"SigLIP + projector + pooling, ONNX Runtime vs PyTorch on 1, 2 and 3 frames{fp16}"
    return f"f_pos, f_ori and f_bev, ONNX Runtime vs PyTorch on 3 input sizes each{fp16}"


def plan_of(request: ExportRequest, weights: dict[str, Weights], form: LLMForm | None, source: str) -> MemoryPlan:
    return memory_plan(request.bundle.config, request.target, weights, form, request.context, request.camera_size, source)


def check_plan(request: ExportRequest, plan: MemoryPlan) -> None:
    tokens_per_frame = 1 + vision_tokens_per_frame(request.bundle.config)
    check_fits(plan, request.bundle.config, tokens_per_frame, request.llm_quant)


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
        "encoders": request.encoders,
        "opset": request.opset,
        **({"cut3r_input": request.cut3r_sizes.to_dict()} if request.bundle.config.encoder_3d == "cut3r" else {}),
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


def artifact_entry(spec: graphs.GraphSpec, path: Path, parity: ParityResult, **extra: Any) -> dict[str, Any]:
    """The manifest entry of one graph: its file and its external data file (both hashed in
    the manifest's ``files`` section)."""
    entry: dict[str, Any] = {"file": path.name, "fused_attention": fused_attention_nodes(path)}
    data = external_data_file(path)
    if data is not None:
        entry["external_data"] = data.name
    return {**entry, **spec.to_dict(), "parity": parity.to_dict(), **extra}


# -- CUT3R -------------------------------------------------------------------------------


def export_camera(request: ExportRequest, out: Path) -> dict[str, Any]:
    """The bundle's 3D encoder + f_cam: ``cut3r_encoder`` + ``cut3r_step``, or ``vggt_encode``."""
    if request.bundle.config.encoder_3d == "vggt":
        return export_vggt(request, out)
    return export_cut3r(request, out)


def export_cut3r(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``cut3r_encoder`` (ViT, any frame count and size) and ``cut3r_step`` (decoder, memory,
    f_cam), checked at 4:3, 16:9, 9:16 and 1:1 (:func:`recurrence_frames` frames at each)."""
    model = request.parts("camera_encoder", "heads")
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
        export_onnx(encoder, specs[0], (images,), out / "cut3r_encoder.onnx", request.opset),
        export_onnx(step, specs[1], (features[:1], positions, init.state_feat, init.memory, torch.ones(1)), out / "cut3r_step.onnx", request.opset),
    )
    save_file({"state": init.state_feat, "memory": init.memory}, str(out / CUT3R_INIT_FILE))
    runners = [TorchRunner(encoder, step), SessionRunner(*(open_session(p) for p in paths))]
    reduced: dict[str, CameraRunner] = {}
    if request.fp16:
        reduced["fp16"] = SessionRunner(*(open_session(write_fp16(p, s)) for p, s in zip(paths, specs)))
    if request.int8:
        reduced["int8"] = SessionRunner(*(open_session(write_int8(p)) for p in paths))
    checks = {}
    for label, ratio in graphs.PARITY_ASPECTS.items():
        height, width = request.cut3r_sizes.aspect(*ratio)
        checks[f"{height}x{width}"] = camera_checks(runners, reduced, specs, init, (height, width), recurrence_frames(label))
    entries = {}
    for spec, path in zip(specs, paths):
        parity = ensure_within(spec, merge([check[spec.name].parity for check in checks.values()]))
        by_aspect = {
            label: {"size": size, **check[spec.name].parity.to_dict()}
            for label, (size, check) in zip(graphs.PARITY_ASPECTS, checks.items())
        }
        extra: dict[str, Any] = {"parity_by_aspect": by_aspect}
        for kind in reduced:
            extra[kind] = reduced_entry(kind, spec, path, [check[spec.name].reduced[kind] for check in checks.values()])
        entries[spec.name] = artifact_entry(spec, path, parity, **extra)
    entries["cut3r_step"]["initial_state"] = CUT3R_INIT_FILE
    if request.calibration is not None:
        state = (init.state_feat.numpy(), init.memory.numpy())
        calibrated = calibrate_cut3r(paths, request.calibration, state, tuple(tolerance(spec, "int8") for spec in specs))
        for spec, entry in zip(specs, calibrated, strict=True):
            entries[spec.name]["int8"] = entry
    return entries


def recurrence_frames(aspect: str) -> int:
    """Frames of the check's recurrence at ``aspect`` (a ``graphs.PARITY_ASPECTS`` label)."""
    return RECURRENCE_FRAMES if aspect == FULL_RECURRENCE_ASPECT else SHORT_RECURRENCE_FRAMES


@dataclass(frozen=True)
class GraphCheck:
    """One graph's ONNX Runtime parity with PyTorch, and its reduced-precision graphs' errors
    (``fp16`` for FP16 targets, ``int8`` with ``--encoders int8``)."""

    parity: ParityResult
    reduced: dict[str, ScaledError]


def camera_checks(
    runners: list[CameraRunner],
    reduced: dict[str, CameraRunner],
    specs: tuple[graphs.GraphSpec, graphs.GraphSpec],
    init: Cut3rState,
    size: tuple[int, int],
    frames: int,
) -> dict[str, GraphCheck]:
    """The encoder's and the step's checks over a ``frames``-frame recurrence at ``size``:
    ``runners`` are PyTorch (the reference) and ONNX Runtime FP32; ``reduced`` the FP16
    graphs (on the first ``FP16_CHECK_FRAMES``: slow on the CPU provider) and the INT8 ones
    (the whole recurrence, each on its own carried state, so drift shows)."""
    images = fixed_images(frames, size)
    state, memory = init.state_feat.numpy(), init.memory.numpy()
    reference, exported = (run_recurrence(r, images, state, memory) for r in runners[:2])
    encoder, step = specs
    errors: dict[str, dict[str, ScaledError]] = {encoder.name: {}, step.name: {}}
    for kind, runner in reduced.items():
        count = FP16_CHECK_FRAMES if kind == "fp16" else frames
        got, want = run_recurrence(runner, images[:count], state, memory), reference.first(count)
        errors[encoder.name][kind] = scaled_error(want.encoded, got.encoded, tolerance(encoder, kind))
        errors[step.name][kind] = merge_scaled([scaled_error(w, g, tolerance(step, kind)) for w, g in zip(want.steps, got.steps, strict=True)])
    return {
        encoder.name: GraphCheck(compare(encoder, reference.encoded, exported.encoded), errors[encoder.name]),
        step.name: GraphCheck(merge([compare(step, want, got) for want, got in zip(reference.steps, exported.steps, strict=True)]), errors[step.name]),
    }


def tolerance(spec: graphs.GraphSpec, kind: str) -> float:
    """The graph's tolerance for its ``kind`` (fp16, int8) form, relative to the output scale."""
    return {"fp16": spec.fp16_tolerance, "int8": spec.int8_tolerance}[kind]


def reduced_entry(kind: str, spec: graphs.GraphSpec, path: Path, errors: list[ScaledError]) -> dict[str, Any]:
    """The ``kind`` (fp16, int8) graph's file and its error against PyTorch FP32 (ONNX Runtime
    CPU); past the graph's tolerance the export fails (an FP16 graph's engines would fail the
    build; an INT8 graph would change the answers)."""
    error = merge_scaled(errors)
    if not error.within_tolerance:
        fix = "export for an fp32 target" if kind == "fp16" else "export without --encoders int8"
        raise InternalError(
            f"{spec.name}: the {kind.upper()} graph is {error.relative:.3g} of the output scale away from FP32 "
            f"(tolerance {error.tolerance:g})",
            f"{fix}, or report it with --debug",
        )
    suffix = FP16_SUFFIX if kind == "fp16" else INT8_SUFFIX
    return {"file": path.with_name(path.name.removesuffix(".onnx") + suffix).name, "error_vs_fp32": error.to_dict()}


# -- VGGT --------------------------------------------------------------------------------


def export_vggt(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``vggt_encode`` (aggregator + f_cam over a whole clip), checked on clips of 2, 5 and 8 frames."""
    model = request.parts("camera_encoder", "heads")
    config = model.camera_encoder.config
    height, width = request.vggt_size or default_vggt_size(config.img_size, config.patch_size)
    module = graphs.CameraClipGraph(model.camera_encoder, model.heads, height, width)
    spec = graphs.camera_clip_spec(height, width, request.bundle.config.llm.hidden_size)
    generator = torch.Generator().manual_seed(5)

    def clip(frames: int) -> tuple[torch.Tensor]:
        return (torch.rand(frames, 3, height, width, generator=generator),)

    path = export_onnx(module, spec, clip(3), out / "vggt_encode.onnx", request.opset)
    parity = check_parity(module, spec, path, lambda run: clip(2 + 3 * run))
    reduced = reduced_variants(request, module, spec, path, lambda run: clip(2 + 3 * run))
    return {"vggt_encode": artifact_entry(spec, path, parity, **reduced)}


# -- vision and heads ----------------------------------------------------------------------


def export_vision(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``vision``: frames -> pooled, projected tokens with row newlines (frames axis dynamic)."""
    config = request.bundle.config
    module = graphs.VisionGraph(request.parts("vision").vision)
    spec = graphs.vision_spec(config.vision.image_size, module.vision.tokens_per_frame, config.llm.hidden_size)
    generator = torch.Generator().manual_seed(7)
    path = export_onnx(module, spec, graphs.random_inputs(spec, generator, {"frames": 2}), out / "vision.onnx", request.opset)
    inputs = sized_inputs(spec, generator, "frames", 1)
    parity = check_parity(module, spec, path, inputs)
    with torch.no_grad():
        save_file({"tokens": module.vision.video_end().detach().float().contiguous()}, str(out / VIDEO_END_FILE))
    entry = artifact_entry(spec, path, parity, video_end=VIDEO_END_FILE, **reduced_variants(request, module, spec, path, inputs))
    if request.calibration is not None:
        entry["int8"] = calibrate_vision(path, request.calibration, tolerance(spec, "int8"))
    return {"vision": entry}


def export_heads(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``pose_head`` (f_pos, f_ori + soft-argmax) and ``bev_head`` (f_bev)."""
    heads = request.parts("heads").heads
    width = request.bundle.config.llm.hidden_size
    generator = torch.Generator().manual_seed(11)
    entries = {}
    for module, spec, axis in (
        (graphs.PoseHeadGraph(heads), graphs.pose_head_spec(width), "batch"),
        (graphs.BevHeadGraph(heads), graphs.bev_head_spec(width), "tokens"),
    ):
        path = export_onnx(module, spec, graphs.random_inputs(spec, generator, {axis: 2}), out / f"{spec.name}.onnx", request.opset)
        inputs = sized_inputs(spec, generator, axis, 3)
        parity = check_parity(module, spec, path, inputs)
        entries[spec.name] = artifact_entry(spec, path, parity, **reduced_variants(request, module, spec, path, inputs))
    return entries


def sized_inputs(spec: graphs.GraphSpec, generator: torch.Generator, axis: str, step: int) -> Callable[[int], tuple]:
    """Fresh random inputs for run 0, 1, ... whose dynamic ``axis`` is 1 + step * run."""
    return lambda run: graphs.random_inputs(spec, generator, {axis: 1 + step * run})


def reduced_variants(
    request: ExportRequest, module: torch.nn.Module, spec: graphs.GraphSpec, path: Path, make_inputs: Callable[[int], tuple], runs: int = 3
) -> dict[str, Any]:
    """``{"fp16": ...}`` for FP16 targets, ``{"int8": ...}`` for an encoder graph with
    ``--encoders int8``: each reduced graph checked against PyTorch on fresh inputs."""
    writers = {}
    if request.fp16:
        writers["fp16"] = lambda: write_fp16(path, spec)
    if request.int8 and spec.name in INT8_GRAPHS:
        writers["int8"] = lambda: write_int8(path)
    entries = {}
    for kind, write in writers.items():
        pairs = paired_runs(module, spec, open_session(write()), make_inputs, runs)
        errors = [scaled_error([t.numpy() for t in expected], actual, tolerance(spec, kind)) for expected, actual in pairs]
        entries[kind] = reduced_entry(kind, spec, path, errors)
    return entries
