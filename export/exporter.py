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
from loc3r.export.llm import LLMForm, LLMSource, export_llm, llm_form
from loc3r.export.llm_io import LLM_DIR
from loc3r.export.manifest import FORMAT, MANIFEST_FILE, VERSION, Manifest, load_manifest
from loc3r.export.memory_plan import MemoryPlan, Weights, check_fits, measured_weights, memory_plan, predicted_weights
from loc3r.export.onnx_export import (
    OPSET,
    ParityResult,
    check_parity,
    compare,
    ensure_within,
    export_onnx,
    merge,
)
from loc3r.export.tensorrt_build import device_build_plan
from loc3r.runtime.ort import open_session
from loc3r.fileio import atomic_directory, current_umask, write_json_atomic
from loc3r.models.bundle import Bundle
from loc3r.models.cut3r import Cut3rState
from loc3r.models.vision import vision_tokens_per_frame

CUT3R_INIT_FILE = "cut3r_init.safetensors"
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
    context_tokens: int | None = None  # the LLM's context limit; None: the target's

    @property
    def context(self) -> int:
        """The context limit: asked for (or the target's), at most the model's."""
        asked = self.context_tokens or self.target.build.max_context_tokens
        return min(asked, self.bundle.config.llm.max_position_embeddings)


def default_cut3r_size(long_side: int, patch: int = 16) -> tuple[int, int]:
    """Landscape 4:3 at the configured long side, e.g. 384x512 (height x width)."""
    return (long_side * 3 // 4) // patch * patch, long_side


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
        if form is not None:
            progress(f"exporting the LLM ({request.llm_quant}, {form.provider} form) ...")
            llm = export_llm(
                LLMSource.from_bundle(bundle),
                staging / LLM_DIR,
                form,
                request.context,
                request.target.llm.prefill_chunk,
                reference=bundle.model.llm,
            )
        measured = plan_of(request, measured_weights(staging, artifacts, llm, request.target), form, "measured from the written files")
        check_plan(request, measured)
        manifest = build_manifest(request, artifacts, llm)
        manifest["memory_plan"] = measured.to_dict()
        manifest["memory_plan"]["predicted_weights"] = {n: w.disk for n, w in predicted.items()}
        write_json_atomic(staging / MANIFEST_FILE, manifest)
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
        "cut3r_size": list(request.cut3r_size),
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
    """``cut3r_step`` (CUT3R step + f_cam), checked over a recurrence from the first frame."""
    model = request.bundle.model
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
    os.chmod(out / CUT3R_INIT_FILE, 0o666 & ~current_umask())  # safetensors writes 0600
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


# -- vision and heads ----------------------------------------------------------------------


def export_vision(request: ExportRequest, out: Path) -> dict[str, Any]:
    """``vision``: frames -> pooled, projected tokens with row newlines (frames axis dynamic)."""
    config = request.bundle.config
    module = graphs.VisionGraph(request.bundle.model.vision)
    spec = graphs.vision_spec(config.vision.image_size, module.vision.tokens_per_frame, config.llm.hidden_size)
    generator = torch.Generator().manual_seed(7)
    path = export_onnx(module, spec, graphs.random_inputs(spec, generator, {"frames": 2}), out / "vision.onnx")
    parity = check_parity(module, spec, path, lambda run: graphs.random_inputs(spec, generator, {"frames": 1 + run}))
    return {"vision": artifact_entry(spec, path, parity)}


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
        parity = check_parity(module, spec, path, lambda run, s=spec, a=axis: graphs.random_inputs(s, generator, {a: 1 + 3 * run}))
        entries[spec.name] = artifact_entry(spec, path, parity)
    return entries
