"""Export a bundle for a target: ONNX graphs with measured parity, the LLM, the manifest.

Everything is written into a staging folder that replaces ``out_dir`` only when the
whole export succeeded (``loc3r.fileio.atomic_directory``), so an interrupted or failing
export leaves nothing half-written; ``write_manifest`` lists and hashes every file in it.
"""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loc3r.engines.targets import Target
from loc3r.export import graphs
from loc3r.export.llm import LLMForm, LLMSource, export_llm, llm_form
from loc3r.export.llm_io import LLM_DIR
from loc3r.export.manifest import EXPORT_KIND, FORMAT, MUTABLE_ENTRIES, VERSION, Manifest, load_manifest, write_manifest
from loc3r.export.memory_plan import MemoryPlan, Weights, check_fits, measured_weights, memory_plan, predicted_weights
from loc3r.export.onnx_export import (
    OPSET,
    ParityResult,
    check_parity,
    compare,
    ensure_within,
    export_onnx,
    external_data_file,
    merge,
)
from loc3r.export.tensorrt_build import device_build_plan
from loc3r.runtime.ort import open_session
from loc3r.fileio import atomic_directory
from loc3r.models.bundle import Bundle
from loc3r.models.loc3r_model import Loc3rModel
from loc3r.models.cut3r import Cut3rState
from loc3r.models.vision import vision_tokens_per_frame

CUT3R_INIT_FILE = "cut3r_init.safetensors"
VIDEO_END_FILE = "video_end.safetensors"  # tokens after the last frame: (k, width), k = 0 or 1
RECURRENCE_FRAMES = 8

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportRequest:
    """What to export: the bundle, the target, the CUT3R input size and the LLM format."""

    bundle: Bundle
    target: Target
    out_dir: Path
    cut3r_size: tuple[int, int]  # (height, width), multiples of 16
    llm_quant: str | None  # None: leave the LLM out (the runtime then uses the bundle's)
    vggt_size: tuple[int, int] | None = None  # (height, width) for a VGGT bundle; None: default_vggt_size
    context_tokens: int | None = None  # the LLM's context limit; None: the target's

    def parts(self, *names: str) -> Loc3rModel:
        """The bundle with only ``names`` loaded, in float32: each export loads what it traces
        and lets it go, so the peak is one graph's weights, never the whole model."""
        return self.bundle.load_parts(names, torch.float32)

    @property
    def context(self) -> int:
        """The context limit: asked for (or the target's), at most the model's."""
        asked = self.context_tokens or self.target.build.max_context_tokens
        return min(asked, self.bundle.config.llm.max_position_embeddings)


def default_cut3r_size(long_side: int, patch: int = 16) -> tuple[int, int]:
    """Landscape 4:3 at the configured long side, e.g. 384x512 (height x width)."""
    return (long_side * 3 // 4) // patch * patch, long_side


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
        for name, export in (
            (bundle.config.encoder_3d, export_camera),
            ("vision", export_vision),
            ("heads", export_heads),
        ):
            progress(f"exporting {name} ...")
            artifacts.update(export(request, staging))
        llm = None
        if form is not None:
            progress(f"exporting the LLM ({request.llm_quant}, {form.provider} form) ...")
            llm = export_llm(
                LLMSource.from_bundle(bundle),
                staging / LLM_DIR,
                form,
                request.context,
                request.target.llm.prefill_chunk,
                reference=bundle.load_parts(("llm",)).llm,
            )
        measured = plan_of(request, measured_weights(staging, artifacts, llm, request.target), form, "measured from the written files")
        check_plan(request, measured)
        manifest = build_manifest(request, artifacts, llm)
        manifest["memory_plan"] = measured.to_dict()
        manifest["memory_plan"]["predicted_weights"] = {n: w.disk for n, w in predicted.items()}
        write_manifest(staging, manifest)
    return load_manifest(request.out_dir)


def plan_of(request: ExportRequest, weights: dict[str, Weights], form: LLMForm | None, source: str) -> MemoryPlan:
    return memory_plan(request.bundle.config, request.target, weights, form, request.context, request.cut3r_size, source)


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
        "opset": OPSET,
        "artifacts": artifacts,
        "llm": llm,
        "tools": tool_versions(),
    }
    if request.bundle.config.encoder_3d == "cut3r":
        manifest["cut3r_size"] = list(request.cut3r_size)
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
    entry: dict[str, Any] = {"file": path.name}
    data = external_data_file(path)
    if data is not None:
        entry["external_data"] = data.name
    return {**entry, **spec.to_dict(), "parity": parity.to_dict(), **extra}


# -- CUT3R -------------------------------------------------------------------------------


def export_camera(request: ExportRequest, out: Path) -> dict[str, Any]:
    """The bundle's 3D encoder + f_cam: ``cut3r_step`` or ``vggt_encode``."""
    if request.bundle.config.encoder_3d == "vggt":
        return export_vggt(request, out)
    return export_cut3r(request, out)


def export_cut3r(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``cut3r_step`` (CUT3R step + f_cam), checked over a recurrence from the first frame."""
    model = request.parts("camera_encoder", "heads")
    height, width = request.cut3r_size
    with torch.no_grad():
        init = model.camera_encoder.init_state(1)
    init = Cut3rState(init.state_feat.detach().contiguous(), init.memory.detach().contiguous())
    module = graphs.CameraStepGraph(model.camera_encoder, model.heads)
    spec = graphs.camera_step_spec(
        height, width, tuple(init.state_feat.shape[1:]), tuple(init.memory.shape[1:]), request.bundle.config.llm.hidden_size
    )
    example = (torch.rand(1, 3, height, width) * 2 - 1, init.state_feat, init.memory, torch.ones(1))
    path = export_onnx(module, spec, example, out / "cut3r_step.onnx")
    save_file({"state": init.state_feat, "memory": init.memory}, str(out / CUT3R_INIT_FILE))
    parity = recurrence_parity(module, spec, path, init, (height, width))
    return {"cut3r_step": artifact_entry(spec, path, parity, initial_state=CUT3R_INIT_FILE)}


def recurrence_parity(
    module: torch.nn.Module,
    spec: graphs.GraphSpec,
    path: Path,
    init: Cut3rState,
    size: tuple[int, int],
    frames: int = RECURRENCE_FRAMES,
) -> ParityResult:
    """Run PyTorch and ONNX Runtime side by side for ``frames`` steps, each on its own state.

    Each side carries its own recurrent state, so drift (e.g. a wrong RoPE row) accumulates
    and shows, as it would at run time.
    """
    session = open_session(path)
    generator = torch.Generator().manual_seed(1234)
    torch_state, torch_memory = init.state_feat, init.memory
    ort_state, ort_memory = init.state_feat.numpy(), init.memory.numpy()
    results = []
    for frame in range(frames):
        first = torch.tensor([1.0 if frame == 0 else 0.0])
        image = torch.rand(1, 3, *size, generator=generator) * 2 - 1
        with torch.inference_mode():
            expected = module(image, torch_state, torch_memory, first)
        actual = session.run(
            spec.output_names,
            {"image": image.numpy(), "state": ort_state, "memory": ort_memory, "first_frame": first.numpy()},
        )
        results.append(compare(spec, expected, actual))
        _, torch_state, torch_memory = expected
        _, ort_state, ort_memory = actual
    return ensure_within(spec, merge(results))


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

    path = export_onnx(module, spec, clip(3), out / "vggt_encode.onnx")
    parity = check_parity(module, spec, path, lambda run: clip(2 + 3 * run))
    return {"vggt_encode": artifact_entry(spec, path, parity)}


# -- vision and heads ----------------------------------------------------------------------


def export_vision(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``vision``: frames -> pooled, projected tokens with row newlines (frames axis dynamic)."""
    config = request.bundle.config
    module = graphs.VisionGraph(request.parts("vision").vision)
    spec = graphs.vision_spec(config.vision.image_size, module.vision.tokens_per_frame, config.llm.hidden_size)
    generator = torch.Generator().manual_seed(7)
    path = export_onnx(module, spec, graphs.random_inputs(spec, generator, {"frames": 2}), out / "vision.onnx")
    parity = check_parity(module, spec, path, lambda run: graphs.random_inputs(spec, generator, {"frames": 1 + run}))
    with torch.no_grad():
        save_file({"tokens": module.vision.video_end().detach().float().contiguous()}, str(out / VIDEO_END_FILE))
    return {"vision": artifact_entry(spec, path, parity, video_end=VIDEO_END_FILE)}


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
        path = export_onnx(module, spec, graphs.random_inputs(spec, generator, {axis: 2}), out / f"{spec.name}.onnx")
        parity = check_parity(module, spec, path, lambda run, s=spec, a=axis: graphs.random_inputs(s, generator, {a: 1 + 3 * run}))
        entries[spec.name] = artifact_entry(spec, path, parity)
    return entries
