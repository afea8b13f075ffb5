"""The onnxruntime backend: the graphs ``loc3r-export`` wrote, described by its manifest.

Here it runs on ONNX Runtime's CPU provider; on a device, onnxruntime-gpu's TensorRT
provider (FP16, engine cache) then CUDA. The runtime refuses a manifest made from
another model or with other shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import Tensor

from loc3r.errors import InputError, ModelError
from loc3r.export.graphs import ImageSizes
from loc3r.export.exporter import CUT3R_INIT_FILE
from loc3r.export.manifest import Manifest, check_manifest_matches
from loc3r.export.tensorrt_build import Profile, bounding_profile
from loc3r.runtime.ort import CPU, import_onnxruntime, open_gpu_session, open_session, provider_names
from loc3r.models.bundle import Bundle
from loc3r.models.vision import vision_tokens_per_frame
from loc3r.runtime.stages import LLMStage

GRAPHS = ("cut3r_encoder", "cut3r_step", "vision", "pose_head", "bev_head")
TRT_CACHE = "ort_trt_cache"


def gpu_manifest(manifest: Manifest) -> bool:
    """An export for a GPU target (it plans TensorRT engines)."""
    return bool(manifest.data.get("device_build"))


def gpu_providers(manifest: Manifest, name: str, available: Sequence[str]) -> list[Any]:
    """TensorRT EP (FP16 as the manifest says, explicit profile shapes, engine and timing
    caches) when present, then CUDA; a GPU export on an ONNX Runtime without CUDA is refused."""
    if "CUDAExecutionProvider" not in available:
        raise ModelError(
            f"{manifest.root} is an export for {manifest.data['target']['name']} (a GPU target), but this onnxruntime "
            f"offers only {', '.join(available)}: it would run on the CPU",
            "install onnxruntime-gpu (x86: pip install -e '.[gpu]'; Jetson: the jetson-ai-lab wheel, see the user guide), "
            "or export with --target cpu to run on the CPU",
        )
    providers: list[Any] = []
    if "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", trt_provider_options(manifest, name)))
    return [*providers, "CUDAExecutionProvider"]


def trt_provider_options(manifest: Manifest, name: str) -> dict[str, Any]:
    """ONNX Runtime TensorRT EP options for one graph: precision, caches, workspace, and the
    plan's profiles as one explicit range (the EP takes one per input)."""
    plan = manifest.data["device_build"]
    cache = str(manifest.root / TRT_CACHE)
    options: dict[str, Any] = {
        "trt_fp16_enable": plan["precision"] == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_max_workspace_size": (plan["workspace_mib"] or 1024) << 20,
    }
    profile = bounding_profile([Profile.from_dict(p) for p in plan["engines"][name]["profiles"]])
    if profile.shapes:  # the dynamic inputs
        for key, index in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1), ("trt_profile_max_shapes", 2)):
            options[key] = ",".join(f"{n}:{'x'.join(map(str, b[index]))}" for n, b in profile.shapes.items())
    return options


def warmup_feeds(manifest: Manifest, name: str) -> dict[str, np.ndarray]:
    """Zeros at the optimal shapes of a graph's first profile (for the placement check)."""
    profile = Profile.from_dict(manifest.data["device_build"]["engines"][name]["profiles"][0])
    shapes = {spec["name"]: profile.shapes[spec["name"]][1] if spec["name"] in profile.shapes else spec["shape"] for spec in manifest.artifacts[name]["inputs"]}
    return {n: np.zeros(shape, dtype=np.float32) for n, shape in shapes.items()}


def open_graph(manifest: Manifest, name: str, providers: Sequence[Any] | None) -> Any:
    """One graph's session: on the providers given, else on the GPU for a GPU export
    (placement verified), else on the CPU."""
    path = manifest.artifact_path(name)
    if providers is not None:
        return open_session(path, providers)
    if not gpu_manifest(manifest):
        return open_session(path, CPU)
    available = import_onnxruntime().get_available_providers()
    return open_gpu_session(path, gpu_providers(manifest, name, available), warmup_feeds(manifest, name))


@dataclass
class OrtCamera:
    """``cut3r_encoder`` on a batch, then ``cut3r_step`` per frame from the initial state;
    the state stays in numpy."""

    encoder: Any
    step_session: Any
    init_state: np.ndarray
    init_memory: np.ndarray
    sizes: ImageSizes

    def encode(self, images: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        self.sizes.check(*images.shape[-2:])
        features, positions = self.encoder.run(["features", "positions"], {"image": images.numpy()})
        return [(features[i : i + 1], positions) for i in range(len(features))]

    def step(self, encoded: tuple[np.ndarray, np.ndarray], state: Any | None) -> tuple[Tensor, Any]:
        features, positions = encoded
        prev_state, prev_memory = (self.init_state, self.init_memory) if state is None else state
        first = np.array([1.0 if state is None else 0.0], dtype=np.float32)
        camera, new_state, new_memory = self.step_session.run(
            ["camera", "new_state", "new_memory"],
            {"features": features, "positions": positions, "state": prev_state, "memory": prev_memory, "first_frame": first},
        )
        return torch.from_numpy(camera[0]), (new_state, new_memory)


@dataclass
class OrtVision:
    session: Any

    def encode(self, pixels: Tensor) -> Tensor:
        (tokens,) = self.session.run(["tokens"], {"pixels": pixels.numpy()})
        return torch.from_numpy(tokens)


@dataclass
class OrtHeads:
    pose_session: Any
    bev_session: Any

    def pose(self, pos_state: Tensor, ori_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xy, sigma, theta = self.pose_session.run(
            ["xy", "sigma", "theta"],
            {"pos_state": pos_state.reshape(1, -1).float().numpy(), "ori_state": ori_state.reshape(1, -1).float().numpy()},
        )
        return torch.as_tensor(xy[0]), torch.as_tensor(sigma[0]), torch.as_tensor(theta[0])

    def bev(self, vision_states: Tensor) -> Tensor:
        (points,) = self.bev_session.run(["points"], {"states": vision_states.float().numpy()})
        return torch.from_numpy(points)


def expected_shapes(bundle: Bundle) -> dict[str, dict[str, list[int | str]]]:
    """Input shapes the bundle implies, checked against the manifest's."""
    config = bundle.config
    width = config.llm.hidden_size
    size = config.vision.image_size
    return {
        "cut3r_encoder": {"image": ["frames", 3, "height", "width"]},
        "vision": {"pixels": ["frames", 3, size, size]},
        "pose_head": {"pos_state": ["batch", width]},
        "bev_head": {"states": ["tokens", width]},
    }


def onnx_stages(bundle: Bundle, manifest: Manifest, providers: Sequence[Any] | None = None) -> tuple[OrtCamera, OrtVision, OrtHeads, LLMStage]:
    """Camera, vision, heads and LLM stages over the manifest's graphs (``providers``: the
    same for every graph; by default the GPU for a GPU export, else the CPU)."""
    check_manifest_matches(manifest, bundle.config.model_id, bundle.checksum, expected_shapes(bundle))
    tokens = manifest.artifacts["vision"]["outputs"][0]["shape"][1]
    if tokens != vision_tokens_per_frame(bundle.config):
        raise InputError(f"the vision graph emits {tokens} tokens per frame, the model needs {vision_tokens_per_frame(bundle.config)}", "re-export")
    sizes = cut3r_sizes(manifest)
    session = {name: open_graph(manifest, name, providers) for name in GRAPHS}
    init = load_file(str(manifest.root / CUT3R_INIT_FILE))
    camera = OrtCamera(session["cut3r_encoder"], session["cut3r_step"], init["state"], init["memory"], sizes)
    llm_providers = providers or (("CUDAExecutionProvider",) if gpu_manifest(manifest) else CPU)
    heads = OrtHeads(session["pose_head"], session["bev_head"])
    return camera, OrtVision(session["vision"]), heads, onnx_llm(bundle, manifest, llm_providers)


def cut3r_sizes(manifest: Manifest) -> ImageSizes:
    """The CUT3R input sizes the manifest's graphs serve."""
    section = manifest.data.get("cut3r_input")
    if not isinstance(section, dict):
        raise ModelError(f"{manifest.root} was exported for one fixed CUT3R size", "re-export it with this loc3r (any aspect ratio)")
    return ImageSizes(**section)


def onnx_llm(bundle: Bundle, manifest: Manifest, providers: Sequence[Any]) -> LLMStage:
    """The exported LLM when the manifest has one, else the bundle's PyTorch LLM."""
    llm = manifest.data.get("llm")
    if not llm:
        from loc3r.models.llm import TorchLLM

        return TorchLLM(bundle.model.llm)
    from loc3r.runtime.onnx_llm import OnnxLLM

    root = manifest.root / "llm"
    # the TensorRT EP has no MatMulNBits: the decoder runs on the CUDA (or CPU) provider
    names = [p for p in provider_names(providers) if p != "TensorrtExecutionProvider"]
    return OnnxLLM(root / llm["decoder"]["file"], root / llm["embeddings"]["file"], names)
