"""The tensorrt backend: native TensorRT 10 engines built on this device by ``loc3r-export build``.

Buffers are torch CUDA tensors handed to TensorRT by address (as TensorRT-LLM's
``Session`` does); the LLM runs through onnxruntime-gpu (CUDA EP, int4 MatMulNBits).

Unverified here: this project has no GPU in CI; TensorRT is imported only when this
backend is asked for, and its absence is a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loc3r.errors import ModelError
from loc3r.export.manifest import Manifest
from loc3r.export.tensorrt_build import check_engine_matches, cuda_device_sm, import_tensorrt
from loc3r.models.bundle import Bundle
from loc3r.runtime.onnx_backend import camera_graph, check_frame_size, clip_size, initial_state, onnx_llm, open_manifest, stage_graphs, video_end
from loc3r.runtime.stages import CameraStage, EncodeBySteps, LLMStage


class TrtSession:
    """One deserialised engine: named input tensors in, named output tensors out."""

    def __init__(self, engine_path: Path) -> None:
        trt = import_tensorrt()
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ModelError(f"{engine_path.name} does not load on this GPU/TensorRT", "rebuild it with loc3r-export build")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        stream = torch.cuda.current_stream()
        keep = {}
        for name, tensor in inputs.items():
            keep[name] = tensor.contiguous().cuda()
            self.context.set_input_shape(name, tuple(keep[name].shape))
            self.context.set_tensor_address(name, keep[name].data_ptr())
        outputs = {}
        for name in self.outputs:
            dtype = torch.float16 if self.engine.get_tensor_dtype(name) == self._trt.DataType.HALF else torch.float32
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ModelError("TensorRT execution failed", "rerun with --debug; rebuild the engines on this device")
        stream.synchronize()
        return {name: t.float().cpu() for name, t in outputs.items()}


@dataclass
class TrtCamera(EncodeBySteps):
    session: TrtSession
    init: dict[str, Tensor]

    def step(self, image: Tensor, state: Any | None) -> tuple[Tensor, Any]:
        prev_state, prev_memory = (self.init["state"], self.init["memory"]) if state is None else state
        first = torch.tensor([1.0 if state is None else 0.0])
        out = self.session.run({"image": image.unsqueeze(0), "state": prev_state, "memory": prev_memory, "first_frame": first})
        return out["camera"][0], (out["new_state"], out["new_memory"])


@dataclass
class TrtClipCamera:
    """``vggt_encode``: a whole clip per call (engine profile: 1..64 frames)."""

    session: TrtSession
    size: tuple[int, int]

    def encode(self, images: Tensor) -> Tensor:
        check_frame_size(images, self.size, "--vggt-size")
        return self.session.run({"images": images})["camera"]


@dataclass
class TrtVision:
    session: TrtSession
    end_tokens: Tensor  # (k, width), from the export's video_end file

    def encode(self, pixels: Tensor) -> Tensor:
        return self.session.run({"pixels": pixels})["tokens"]

    def video_end(self) -> Tensor:
        return self.end_tokens


@dataclass
class TrtHeads:
    pose_session: TrtSession
    bev_session: TrtSession

    def pose(self, pos_state: Tensor, ori_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.pose_session.run({"pos_state": pos_state.reshape(1, -1).float(), "ori_state": ori_state.reshape(1, -1).float()})
        return out["xy"][0], out["sigma"][0], out["theta"][0]

    def bev(self, vision_states: Tensor) -> Tensor:
        return self.bev_session.run({"states": vision_states.float()})["points"]


def tensorrt_stages(bundle: Bundle, manifest: Manifest) -> tuple[CameraStage, TrtVision, TrtHeads, LLMStage]:
    """Stages over the engines the manifest lists as built on this device."""
    open_manifest(bundle, manifest)
    end_tokens = video_end(bundle, manifest)
    trt = import_tensorrt()
    if not manifest.data.get("engines"):
        raise ModelError(
            f"no TensorRT engines have been built in {manifest.root}",
            f"run 'loc3r-export build --manifest {manifest.root}/manifest.json' on this device",
        )
    sm = cuda_device_sm()
    sessions = {}
    for name in stage_graphs(bundle, manifest):
        engine = manifest.file(manifest.value("engines", "files", name))
        check_engine_matches(engine, trt.__version__, sm)
        sessions[name] = TrtSession(engine)
    graph = camera_graph(bundle, manifest)
    if graph == "vggt_encode":
        camera: CameraStage = TrtClipCamera(sessions[graph], clip_size(manifest))
    else:
        camera = TrtCamera(sessions[graph], initial_state(manifest))
    heads = TrtHeads(sessions["pose_head"], sessions["bev_head"])
    llm = onnx_llm(bundle, manifest, ("CUDAExecutionProvider", "CPUExecutionProvider"))
    return camera, TrtVision(sessions["vision"], end_tokens), heads, llm
