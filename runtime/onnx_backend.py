"""The onnxruntime backend: the graphs ``loc3r-export`` wrote, described by its manifest.

Here it runs on ONNX Runtime's CPU provider; on a device, onnxruntime-gpu's TensorRT
provider (FP16, engine cache) then CUDA. The runtime refuses a manifest made from
another model or with other shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import Tensor

from loc3r.errors import InputError
from loc3r.export.exporter import CUT3R_INIT_FILE
from loc3r.export.manifest import Manifest, check_manifest_matches
from loc3r.runtime.ort import CPU, open_session, provider_names
from loc3r.models.bundle import Bundle
from loc3r.models.vision import vision_tokens_per_frame
from loc3r.runtime.stages import LLMStage

def default_providers(cache_dir: Path) -> list[Any]:
    """On a device with onnxruntime-gpu: TensorRT EP (FP16, engine cache), CUDA, CPU; else CPU."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return list(CPU)
    return [
        ("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir)}),
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


@dataclass
class OrtCamera:
    """``cut3r_step`` from the initial state on the first frame; the state stays in numpy."""

    session: Any
    init_state: np.ndarray
    init_memory: np.ndarray
    size: tuple[int, int]

    def step(self, image: Tensor, state: Any | None) -> tuple[Tensor, Any]:
        if tuple(image.shape[-2:]) != self.size:
            height, width = image.shape[-2:]
            raise InputError(
                f"the CUT3R graph was exported for {self.size[0]}x{self.size[1]} frames, this video gives {height}x{width}",
                f"re-export with loc3r-export --cut3r-size {height}x{width}",
            )
        prev_state, prev_memory = (self.init_state, self.init_memory) if state is None else state
        first = np.array([1.0 if state is None else 0.0], dtype=np.float32)
        camera, new_state, new_memory = self.session.run(
            ["camera", "new_state", "new_memory"],
            {"image": image.unsqueeze(0).numpy(), "state": prev_state, "memory": prev_memory, "first_frame": first},
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
        "vision": {"pixels": ["frames", 3, size, size]},
        "pose_head": {"pos_state": ["batch", width]},
        "bev_head": {"states": ["tokens", width]},
    }


def onnx_stages(bundle: Bundle, manifest: Manifest, providers: Sequence[Any] | None = None) -> tuple[OrtCamera, OrtVision, OrtHeads, LLMStage]:
    """Camera, vision, heads and LLM stages over the manifest's graphs."""
    providers = providers or default_providers(manifest.root / "ort_trt_cache")
    check_manifest_matches(manifest, bundle.config.model_id, bundle.checksum, expected_shapes(bundle))
    tokens = manifest.artifacts["vision"]["outputs"][0]["shape"][1]
    if tokens != vision_tokens_per_frame(bundle.config):
        raise InputError(f"the vision graph emits {tokens} tokens per frame, the model needs {vision_tokens_per_frame(bundle.config)}", "re-export")
    session = {name: open_session(manifest.artifact_path(name), providers) for name in manifest.artifacts}
    init = load_file(str(manifest.root / CUT3R_INIT_FILE))
    height, width = manifest.data["cut3r_size"]
    camera = OrtCamera(session["cut3r_step"], init["state"], init["memory"], (height, width))
    return camera, OrtVision(session["vision"]), OrtHeads(session["pose_head"], session["bev_head"]), onnx_llm(bundle, manifest, providers)


def onnx_llm(bundle: Bundle, manifest: Manifest, providers: Sequence[Any]) -> LLMStage:
    """The exported LLM when the manifest has one, else the bundle's PyTorch LLM."""
    llm = manifest.data.get("llm")
    if not llm:
        from loc3r.models.llm import TorchLLM

        return TorchLLM(bundle.model.llm)
    from loc3r.runtime.onnx_llm import OnnxLLM

    # the TensorRT EP has no MatMulNBits / GroupQueryAttention: the decoder runs on CUDA (or CPU)
    names = [p for p in provider_names(providers) if p != "TensorrtExecutionProvider"]
    return OnnxLLM(
        manifest.root / llm["decoder"]["file"],
        manifest.root / llm["embeddings"]["file"],
        capacity=llm["context_tokens"],
        chunk_tokens=llm["prefill_chunk_tokens"],
        providers=names,
    )
