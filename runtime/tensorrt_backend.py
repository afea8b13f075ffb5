"""The tensorrt backend: native TensorRT engines built on this device by ``loc3r-export build``.

Lean by construction: one CUDA stream (cuda-python, no CUDA torch), every buffer allocated
once at its engine's largest shapes, one activation scratch shared by all engines (they
run one after another on that stream), every input shape checked against the engine's
optimisation profiles before TensorRT sees it. CUT3R's encoder runs on a batch of frames;
its features, the recurrent state and the pose memory stay on the device between frames
(only the camera token comes back), and the step is replayed from a CUDA graph once its
shape has run once. The LLM runs through onnxruntime-gpu.

Unverified here: this project has no GPU in CI; TensorRT and cuda-python are imported only
when this backend is asked for, and the logic is tested against fake modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loc3r.errors import InputError, InternalError, Loc3rError, ModelError
from loc3r.export.image_sizes import ImageSizes
from loc3r.export.manifest import Manifest
from loc3r.export.runtime_versions import LLM, check_onnxruntime
from loc3r.export.tensorrt_build import Profile, check_engine_matches, import_tensorrt
from loc3r.models.bundle import Bundle
from loc3r.runtime.cuda import Device, gpu_info
from loc3r.runtime.arrays import Array as Tensor
from loc3r.runtime.arrays import to_numpy
from loc3r.runtime.onnx_backend import check_frame_size
from loc3r.runtime.ort import import_onnxruntime
from loc3r.runtime.stages import CameraStage, EncodeBySteps, LLMStage

log = logging.getLogger("loc3r.tensorrt")
Shape = tuple[int, ...]


class TrtSession:
    """One engine on a shared ``Device``: named tensors, buffers sized once for the largest
    shapes its profiles allow, shapes checked against those profiles before every run."""

    def __init__(self, trt: Any, engine_path: Path, device: Device) -> None:
        self.name = engine_path.name
        self.device = device
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ModelError(f"{self.name} does not load with this GPU/TensorRT", "rebuild it with loc3r-export build")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        not_fp32 = [n for n in names if self.engine.get_tensor_dtype(n) != trt.float32]
        if not_fp32:
            raise ModelError(f"{self.name} has non-FP32 inputs/outputs {not_fp32}", "rebuild it with loc3r-export build")
        self.profiles = [self._profile(i) for i in range(self.engine.num_optimization_profiles)]
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self._active: int | None = None
        self._buffers = {name: device.alloc(4 * self._largest(name)) for name in names}
        for name, pointer in self._buffers.items():
            self.context.set_tensor_address(name, pointer)

    def _profile(self, index: int) -> Profile:
        """Profile ``index`` over every input (fixed inputs have min = opt = max)."""
        shapes = {}
        for name in self.inputs:
            fixed = tuple(self.engine.get_tensor_shape(name))
            bounds = (fixed,) * 3 if -1 not in fixed else tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, index))
            shapes[name] = bounds
        return Profile(shapes)

    def _largest(self, name: str) -> int:
        """Elements of ``name`` at the largest input shapes of any profile."""
        if name in self.inputs:
            return max(int(np.prod(p.shapes[name][2])) for p in self.profiles)
        largest = 0
        for profile in self.profiles:
            self.select({n: bounds[2] for n, bounds in profile.shapes.items()})
            largest = max(largest, int(np.prod(self.shape(name))))
        return largest

    @property
    def activation_bytes(self) -> int:
        """Scratch memory this engine's context needs (the largest over its profiles)."""
        size = getattr(self.engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
        return int(self.engine.device_memory_size if size is None else size)

    def use_activation_memory(self, pointer: int, nbytes: int) -> None:
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
            self.context.set_device_memory(pointer, nbytes)
        else:
            self.context.device_memory = pointer

    def max_batch(self, name: str) -> int:
        """The largest first dimension of input ``name`` any profile accepts."""
        return max(p.shapes[name][2][0] for p in self.profiles)

    def select(self, shapes: dict[str, Shape]) -> None:
        """Set the input shapes, after checking them against the profiles (switching profile
        when another one holds them): a shape outside every profile is a clear error, never
        a TensorRT failure."""
        index = next((i for i, p in enumerate(self.profiles) if p.contains(shapes)), None)
        if index is None:
            given = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())
            allowed = " | ".join(p.describe() for p in self.profiles)
            raise InputError(
                f"{self.name}: {given} is outside the engine's optimisation profiles ({allowed})",
                "use inputs within them, or re-export and rebuild the engines for these sizes",
            )
        if index != self._active:
            if not self.context.set_optimization_profile_async(index, self.device.stream_handle):
                raise InternalError(f"{self.name}: TensorRT refused optimisation profile {index}", "rebuild the engines")
            self._active = index
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(shape)):
                raise InputError(f"{self.name}: TensorRT refused the shape {tuple(shape)} for {name}", "rebuild the engines")

    def shape(self, name: str) -> Shape:
        """Current shape of ``name`` (outputs: inferred from the inputs set)."""
        return tuple(self.context.get_tensor_shape(name))

    def buffer(self, name: str) -> int:
        return self._buffers[name]

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.device.stream_handle):
            raise InternalError(f"TensorRT failed to run {self.name}", "rerun with --debug; rebuild the engines on this device")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out (synchronous): for batches, heads and checks."""
        arrays = {name: np.ascontiguousarray(feeds[name], dtype=np.float32) for name in self.inputs}
        self.select({name: array.shape for name, array in arrays.items()})
        for name, array in arrays.items():
            self.device.upload(self._buffers[name], array)
        self.execute()
        outputs = {name: np.empty(self.shape(name), dtype=np.float32) for name in self.outputs}
        for name, array in outputs.items():
            self.device.download(array, self._buffers[name])
        self.device.synchronize()
        return outputs


def share_activation_memory(sessions: Sequence[TrtSession], device: Device) -> int:
    """One scratch allocation, the largest any engine needs, given to every context."""
    nbytes = max(s.activation_bytes for s in sessions)
    pointer = device.alloc(nbytes)
    for session in sessions:
        session.use_activation_memory(pointer, nbytes)
    return nbytes


def run_chunked(session: TrtSession, input_name: str, array: np.ndarray, output_name: str) -> np.ndarray:
    """``session`` over ``array`` in pieces along axis 0 no larger than its profiles allow."""
    step = session.max_batch(input_name)
    parts = [session.run({input_name: array[i : i + step]})[output_name] for i in range(0, len(array), step)]
    return np.concatenate(parts)


@dataclass(frozen=True)
class EncodedFrame:
    """Where one frame's CUT3R features wait on the device: row ``index`` of batch ``batch``."""

    batch: int
    index: int
    patches: int


@dataclass(frozen=True)
class DeviceState:
    """The recurrent state after ``steps`` frames; its tensors live in the step engine's buffers."""

    steps: int


class TrtCamera(EncodeBySteps):
    """``cut3r_encoder`` on a batch, ``cut3r_step`` per frame, the state kept on the device."""

    def __init__(self, encoder: TrtSession, step: TrtSession, init: dict[str, np.ndarray], sizes: ImageSizes, graphs: bool = True) -> None:
        self.encoder, self.step_engine, self.device = encoder, step, step.device
        self.init = {name: np.ascontiguousarray(init[name], dtype=np.float32) for name in ("state", "memory")}
        self.sizes = sizes
        self.use_graphs = graphs
        self._batch = 0
        self._steps = 0
        self._flag = np.zeros(1, dtype=np.float32)
        self._images: np.ndarray | None = None  # the batch being uploaded
        self._graphs: dict[int, Any] = {}
        self._warm: set[int] = set()

    def encode_frames(self, images: Tensor) -> list[EncodedFrame]:
        self.sizes.check(*images.shape[-2:])
        self._images = np.ascontiguousarray(to_numpy(images), dtype=np.float32)
        self.encoder.select({"image": self._images.shape})
        self.device.upload(self.encoder.buffer("image"), self._images)
        self.encoder.execute()
        self._batch += 1
        patches = self.encoder.shape("positions")[0]
        return [EncodedFrame(self._batch, i, patches) for i in range(len(self._images))]

    def step(self, encoded: EncodedFrame, state: DeviceState | None) -> tuple[Tensor, DeviceState]:
        if encoded.batch != self._batch:
            raise InternalError("a CUT3R encoding was used after the next batch replaced it")
        engine, device = self.step_engine, self.device
        if state is None:
            self._steps = 0
            for name, array in self.init.items():
                device.upload(engine.buffer(name), array)
        elif state.steps != self._steps:
            raise InternalError("the TensorRT camera keeps one state on the device: it can only continue from its latest step")
        width = self.encoder.shape("features")[-1]
        patches = encoded.patches
        engine.select(
            {
                "features": (1, patches, width),
                "positions": (patches, 2),
                "state": self.init["state"].shape,
                "memory": self.init["memory"].shape,
                "first_frame": (1,),
            }
        )
        row = 4 * patches * width
        device.copy(engine.buffer("features"), self.encoder.buffer("features") + encoded.index * row, row)
        device.copy(engine.buffer("positions"), self.encoder.buffer("positions"), 4 * patches * 2)
        self._flag[0] = 1.0 if state is None else 0.0
        device.upload(engine.buffer("first_frame"), self._flag)
        self._run_step(patches)
        camera = np.empty(engine.shape("camera"), dtype=np.float32)
        device.download(camera, engine.buffer("camera"))
        device.synchronize()
        self._steps += 1
        return camera[0], DeviceState(self._steps)

    def _run_step(self, patches: int) -> None:
        """The step and the copy of its new state/memory over its inputs: replayed from a
        CUDA graph once this shape has run once (TensorRT wants a plain run first, after a
        shape change); without graph support, run directly."""
        if patches in self._graphs:
            self.device.launch(self._graphs[patches])
            return
        if self.use_graphs and patches in self._warm:
            try:
                with self.device.capture() as graph:
                    self._step_and_carry()
                self._graphs[patches] = graph[0]
                self.device.launch(graph[0])
                return
            except (Loc3rError, RuntimeError) as exc:
                log.debug("CUDA graph capture unavailable (%s); running the step directly", exc)
                self.use_graphs = False
        self._step_and_carry()
        self._warm.add(patches)

    def _step_and_carry(self) -> None:
        engine = self.step_engine
        engine.execute()
        for new, old in (("new_state", "state"), ("new_memory", "memory")):
            self.device.copy(engine.buffer(old), engine.buffer(new), self.init[old].nbytes)


@dataclass
class TrtClipCamera:
    """``vggt_encode``: a whole clip per call (engine profile: 1..64 frames)."""

    session: TrtSession
    size: tuple[int, int]

    def encode(self, images: Tensor) -> Tensor:
        check_frame_size(images, self.size, "--vggt-size")
        return self.session.run({"images": to_numpy(images)})["camera"]


@dataclass
class TrtVision:
    session: TrtSession
    end_tokens: Tensor  # (k, width), from the export's video_end file

    def encode(self, pixels: Tensor) -> Tensor:
        return run_chunked(self.session, "pixels", to_numpy(pixels), "tokens")

    def video_end(self) -> Tensor:
        return self.end_tokens


@dataclass
class TrtHeads:
    pose_session: TrtSession
    bev_session: TrtSession

    def pose(self, pos_state: Tensor, ori_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feeds = {"pos_state": to_numpy(pos_state).reshape(1, -1), "ori_state": to_numpy(ori_state).reshape(1, -1)}
        out = self.pose_session.run(feeds)
        return out["xy"][0], out["sigma"][0], out["theta"][0]

    def bev(self, vision_states: Tensor) -> Tensor:
        return run_chunked(self.bev_session, "states", to_numpy(vision_states), "points")


def open_engines(manifest: Manifest, device: Device, names: Sequence[str]) -> dict[str, TrtSession]:
    """The engines ``names`` the manifest lists as built, after checking each was built for
    this TensorRT and GPU; they share one activation scratch."""
    trt = import_tensorrt()
    if not manifest.data.get("engines"):
        raise ModelError(
            f"no TensorRT engines have been built in {manifest.root}",
            f"run 'loc3r-export build --manifest {manifest.root}/manifest.json' on this device",
        )
    built = manifest.value("engines", "files", kind=dict)
    missing = [name for name in names if name not in built]
    if missing:
        raise ModelError(f"{manifest.root} has no {missing[0]} engine", "re-export with this loc3r and rebuild the engines")
    sm = gpu_info().sm
    sessions = {}
    for name in names:
        path = manifest.file(manifest.value("engines", "files", name))
        check_engine_matches(path, trt.__version__, sm)
        sessions[name] = TrtSession(trt, path, device)
    share_activation_memory(list(sessions.values()), device)
    return sessions


def tensorrt_stages(bundle: Bundle, manifest: Manifest) -> tuple[CameraStage, TrtVision, TrtHeads, LLMStage]:
    """Stages over the engines built on this device; the LLM on onnxruntime-gpu."""
    from loc3r.runtime.onnx_backend import clip_size, cut3r_sizes, initial_state, onnx_llm, open_manifest, stage_graphs, video_end

    open_manifest(bundle, manifest)
    if manifest.data.get("llm"):  # the LLM runs on onnxruntime-gpu: refused before any engine opens
        check_onnxruntime(manifest.data.get("runtime_minimums"), [LLM], import_onnxruntime().__version__)
    end_tokens = video_end(bundle, manifest)
    sessions = open_engines(manifest, Device(), stage_graphs(bundle, manifest))
    if bundle.config.encoder_3d == "vggt":
        camera: CameraStage = TrtClipCamera(sessions["vggt_encode"], clip_size(manifest))
    else:
        camera = TrtCamera(sessions["cut3r_encoder"], sessions["cut3r_step"], initial_state(manifest), cut3r_sizes(manifest))
    heads = TrtHeads(sessions["pose_head"], sessions["bev_head"])
    llm = onnx_llm(bundle, manifest, ("CUDAExecutionProvider",))
    return camera, TrtVision(sessions["vision"], end_tokens), heads, llm
