"""The onnxruntime backend: the graphs ``loc3r-export`` wrote, described by its manifest.

Here it runs on ONNX Runtime's CPU provider; on a device, onnxruntime-gpu's TensorRT
provider (FP16, engine cache) then CUDA. The runtime refuses a manifest made from
another model or with other shapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from loc3r.errors import InputError, ModelError
from loc3r.export.image_sizes import ImageSizes
from loc3r.export.manifest import Manifest, check_manifest_matches
from loc3r.export.runtime_versions import LLM, check_onnxruntime
from loc3r.export.tensorrt_build import Profile, bounding_profile
from loc3r.runtime import ort
from loc3r.models.bundle import Bundle
from loc3r.models.layout import video_end_tokens, vision_tokens_per_frame
from loc3r.runtime.arrays import Array, to_numpy
from loc3r.runtime.ort import CPU, import_onnxruntime, open_gpu_session, open_session, provider_names
from loc3r.runtime.stages import CameraStage, EncodeBySteps, LLMStage

TRT_CACHE = "ort_trt_cache"
GIB = 2**30
log = logging.getLogger(__name__)
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


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
        why = ort.nvinfer_error()
        if why is None:
            providers.append(("TensorrtExecutionProvider", trt_provider_options(manifest, name)))
        else:
            warn_once(f"ONNX Runtime lists the TensorRT provider but {why}: the graphs run on the CUDA provider (loc3r-doctor says how to fix it)")
    return [*providers, "CUDAExecutionProvider"]


def trt_provider_options(manifest: Manifest, name: str) -> dict[str, Any]:
    """ONNX Runtime TensorRT EP options for one graph: precision, caches, workspace, and the
    plan's profiles as one explicit range (the EP takes one per input)."""
    plan = manifest.data["device_build"]
    cache = str(manifest.root / TRT_CACHE)
    options: dict[str, Any] = {
        "trt_fp16_enable": plan["precision"] == "fp16",
        "trt_layer_norm_fp32_fallback": plan["precision"] == "fp16",  # as the engine build keeps norms FP32
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


def warmup_feeds(manifest: Manifest, name: str, seed: int | None = None) -> dict[str, np.ndarray]:
    """Inputs at the optimal shapes of a graph's first profile: zeros (the placement check),
    or seeded normal values (the accuracy check)."""
    profile = Profile.from_dict(manifest.data["device_build"]["engines"][name]["profiles"][0])
    shapes = {spec["name"]: profile.shapes[spec["name"]][1] if spec["name"] in profile.shapes else spec["shape"] for spec in manifest.artifacts[name]["inputs"]}
    if seed is None:
        return {n: np.zeros(shape, dtype=np.float32) for n, shape in shapes.items()}
    generator = np.random.default_rng(seed)
    return {n: generator.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}


# graphs run once per frame at one shape, whose arena blocks are reused frame after frame
ARENA_GRAPHS = frozenset({"cut3r_step"})


def checked_trt_session(manifest: Manifest, name: str, session: Any) -> Any:
    """A TensorRT EP session (FP16) checked against ONNX Runtime FP32 on the CPU on seeded
    inputs, as ``loc3r-export build`` checks its engines; past the graph's tolerance the
    graph runs on the CUDA provider (FP32) instead, with a warning."""
    from loc3r.export.device_build import tolerance
    from loc3r.export.precision import scaled_error

    path = manifest.artifact_path(name)
    feeds = warmup_feeds(manifest, name, seed=len(name))
    reference = open_session(path, CPU)
    want = reference.run(None, feeds)
    del reference
    error = scaled_error(want, session.run(None, feeds), tolerance(manifest, name))
    if error.within_tolerance:
        return session
    warn_once(
        f"{path.name} on the TensorRT provider (FP16) is {error.relative:.3g} of its output scale away from ONNX Runtime FP32 "
        f"(tolerance {error.tolerance:g}): it runs on the CUDA provider instead"
    )
    return open_gpu_session(path, ["CUDAExecutionProvider"], warmup_feeds(manifest, name))


def open_graph(manifest: Manifest, name: str, providers: Sequence[Any] | None) -> Any:
    """One graph's session: on the providers given, else on the GPU for a GPU export
    (placement verified), else on the CPU. CUT3R's step, run once per frame at one shape,
    keeps its CPU memory arena; the batched graphs do not (see ``session_options``)."""
    path = manifest.graph_file(name)
    arena = name in ARENA_GRAPHS
    if providers is not None:
        return open_session(path, providers, arena=arena)
    if not gpu_manifest(manifest):
        return open_session(path, CPU, arena=arena)
    available = import_onnxruntime().get_available_providers()
    providers = gpu_providers(manifest, name, available)
    session = open_gpu_session(path, providers, warmup_feeds(manifest, name))
    if provider_names(providers)[0] == "TensorrtExecutionProvider" and manifest.data["device_build"]["precision"] == "fp16":
        return checked_trt_session(manifest, name, session)
    return session


def check_frame_size(image: Array, size: tuple[int, int], flag: str) -> None:
    """Refuse frames of another size than the camera graph was exported for."""
    if tuple(image.shape[-2:]) != size:
        height, width = image.shape[-2:]
        raise InputError(
            f"the 3D-encoder graph was exported for {size[0]}x{size[1]} frames, this video gives {height}x{width}",
            f"re-export with loc3r-export {flag} {height}x{width}",
        )


@dataclass
class OrtCamera(EncodeBySteps):
    """``cut3r_encoder`` on a batch, then ``cut3r_step`` per frame from the initial state;
    the state stays in numpy."""

    encoder: Any
    step_session: Any
    init_state: np.ndarray
    init_memory: np.ndarray
    sizes: ImageSizes

    def encode_frames(self, images: Array) -> list[tuple[np.ndarray, np.ndarray]]:
        self.sizes.check(*images.shape[-2:])
        features, positions = self.encoder.run(["features", "positions"], {"image": _float32(images)})
        return [(features[i : i + 1], positions) for i in range(len(features))]

    def step(self, encoded: tuple[np.ndarray, np.ndarray], state: Any | None) -> tuple[np.ndarray, Any]:
        features, positions = encoded
        prev_state, prev_memory = (self.init_state, self.init_memory) if state is None else state
        first = np.array([1.0 if state is None else 0.0], dtype=np.float32)
        camera, new_state, new_memory = self.step_session.run(
            ["camera", "new_state", "new_memory"],
            {"features": features, "positions": positions, "state": prev_state, "memory": prev_memory, "first_frame": first},
        )
        return camera[0], (new_state, new_memory)


@dataclass
class OrtClipCamera:
    """``vggt_encode``: a whole clip per call (the frame count is free, the size fixed)."""

    session: Any
    size: tuple[int, int]

    def encode(self, images: Array) -> np.ndarray:
        check_frame_size(images, self.size, "--vggt-size")
        (camera,) = self.session.run(["camera"], {"images": _float32(images)})
        return camera


@dataclass
class OrtVision:
    session: Any
    end_tokens: np.ndarray  # (k, width), from the export's video_end file

    def encode(self, pixels: Array) -> np.ndarray:
        (tokens,) = self.session.run(["tokens"], {"pixels": _float32(pixels)})
        return tokens

    def video_end(self) -> np.ndarray:
        return self.end_tokens


@dataclass
class OrtHeads:
    pose_session: Any
    bev_session: Any

    def pose(self, pos_state: Array, ori_state: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xy, sigma, theta = self.pose_session.run(
            ["xy", "sigma", "theta"],
            {"pos_state": _float32(pos_state).reshape(1, -1), "ori_state": _float32(ori_state).reshape(1, -1)},
        )
        return xy[0], sigma[0], theta[0]

    def bev(self, vision_states: Array) -> np.ndarray:
        (points,) = self.bev_session.run(["points"], {"states": _float32(vision_states)})
        return points


def _float32(values: Array) -> np.ndarray:
    """A contiguous float32 numpy array of ``values`` (a graph input)."""
    return np.ascontiguousarray(to_numpy(values), dtype=np.float32)


def expected_shapes(bundle: Bundle) -> dict[str, dict[str, list[int | str]]]:
    """Tensor shapes the bundle implies, checked against the manifest's."""
    config = bundle.config
    width = config.llm.hidden_size
    size = config.vision.image_size
    return {
        **({"cut3r_encoder": {"image": ["frames", 3, "height", "width"]}} if config.encoder_3d == "cut3r" else {}),
        "vision": {"pixels": ["frames", 3, size, size], "tokens": ["frames", vision_tokens_per_frame(config), width]},
        "pose_head": {"pos_state": ["batch", width]},
        "bev_head": {"states": ["tokens", width]},
    }


def open_manifest(bundle: Bundle, manifest: Manifest) -> None:
    """Refuse a manifest of another model or shape, then verify every file it lists."""
    check_manifest_matches(manifest, bundle.config.model_id, bundle.checksum, expected_shapes(bundle))
    manifest.verify()


def stage_graphs(bundle: Bundle, manifest: Manifest) -> tuple[str, ...]:
    """The graphs the stages run: the bundle's 3D encoder's, the vision tower's and the heads'."""
    return (*camera_graphs(bundle, manifest), "vision", "pose_head", "bev_head")


def onnx_stages(bundle: Bundle, manifest: Manifest, providers: Sequence[Any] | None = None) -> tuple[CameraStage, OrtVision, OrtHeads, LLMStage]:
    """Camera, vision, heads and LLM stages over the manifest's graphs (``providers``: the
    same for every graph; by default the GPU for a GPU export, else the CPU)."""
    open_manifest(bundle, manifest)
    check_onnxruntime(manifest.data.get("runtime_minimums"), [*stage_graphs(bundle, manifest), LLM], import_onnxruntime().__version__)
    session = {name: open_graph(manifest, name, providers) for name in stage_graphs(bundle, manifest)}
    vision = OrtVision(session["vision"], video_end(bundle, manifest))
    heads = OrtHeads(session["pose_head"], session["bev_head"])
    llm_providers = providers or (("CUDAExecutionProvider",) if gpu_manifest(manifest) else CPU)
    return ort_camera(bundle, manifest, session), vision, heads, onnx_llm(bundle, manifest, llm_providers)


def video_end(bundle: Bundle, manifest: Manifest) -> np.ndarray:
    """The video-end tokens the export stored, ``(k, width)``, checked against the bundle's
    layout (``k`` is 1 for a newline after the whole video, else 0)."""
    config = bundle.config
    file = manifest.file(manifest.value("artifacts", "vision", "video_end"))
    end = manifest.float_tensors(manifest.value("artifacts", "vision", "video_end")).get("tokens")
    expected = (video_end_tokens(config), config.llm.hidden_size)
    if end is None or tuple(end.shape) != expected:
        found = None if end is None else tuple(end.shape)
        raise ModelError(f"{file} holds video-end tokens of shape {found}, the model's layout needs {expected}", "re-export")
    return end


CAMERA_GRAPHS = {"cut3r": ("cut3r_encoder", "cut3r_step"), "vggt": ("vggt_encode",)}


def camera_graphs(bundle: Bundle, manifest: Manifest) -> tuple[str, ...]:
    """The names of the bundle's 3D-encoder graphs, which the manifest must hold."""
    names = CAMERA_GRAPHS[bundle.config.encoder_3d]
    for name in names:
        manifest.artifact_path(name)  # a clear error when one is missing
    return names


def clip_size(manifest: Manifest) -> tuple[int, int]:
    """(height, width) the ``vggt_encode`` graph was exported for."""
    size = list(manifest.tensor_shape("vggt_encode", "images")[-2:])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise manifest.corrupt(f"the vggt_encode image size {size!r} is not [height, width]")
    return size[0], size[1]


def ort_camera(bundle: Bundle, manifest: Manifest, session: dict[str, Any]) -> CameraStage:
    """The camera stage over the manifest's 3D-encoder graphs."""
    if bundle.config.encoder_3d == "vggt":
        return OrtClipCamera(session["vggt_encode"], clip_size(manifest))
    init = initial_state(manifest)
    return OrtCamera(session["cut3r_encoder"], session["cut3r_step"], init["state"], init["memory"], cut3r_sizes(manifest))


def initial_state(manifest: Manifest) -> dict[str, np.ndarray]:
    """CUT3R's state and memory before the first frame, as the export saved them."""
    state = manifest.float_tensors(manifest.value("artifacts", "cut3r_step", "initial_state"))
    if set(state) != {"state", "memory"}:
        raise manifest.corrupt("the CUT3R initial state file does not hold 'state' and 'memory'")
    return state


def cut3r_sizes(manifest: Manifest) -> ImageSizes:
    """The CUT3R input sizes the manifest's graphs serve."""
    section = manifest.data.get("cut3r_input")
    if not isinstance(section, dict):
        raise ModelError(f"{manifest.root} was exported for one fixed CUT3R size", "re-export it with this loc3r (any aspect ratio)")
    fields = ("long_side", "min_short_side", "patch")
    if set(section) != set(fields) or not all(isinstance(section[f], int) and not isinstance(section[f], bool) and section[f] > 0 for f in fields):
        raise manifest.corrupt(f"'cut3r_input' {section!r} is not {{long_side, min_short_side, patch}} in pixels")
    return ImageSizes(**section)


def onnx_llm(bundle: Bundle, manifest: Manifest, providers: Sequence[Any]) -> LLMStage:
    """The exported LLM when the manifest has one, else the bundle's PyTorch LLM."""
    if not manifest.data.get("llm"):
        from loc3r.models.llm import TorchLLM

        return TorchLLM(bundle.load_parts(("llm",)).llm)
    from loc3r.runtime.onnx_llm import OnnxLLM

    llm = manifest.value("llm", kind=dict)
    # the TensorRT EP has no MatMulNBits / GroupQueryAttention: the decoder runs on CUDA (or CPU)
    names = [p for p in provider_names(providers) if p != "TensorrtExecutionProvider"]
    sizes = bundle.config.llm
    return OnnxLLM(
        manifest.file(manifest.value("llm", "decoder", "file")),
        manifest.file(manifest.value("llm", "embeddings", "file")),
        capacity=checked_context(manifest, bundle),
        chunk_tokens=llm["prefill_chunk_tokens"],
        providers=names,
        geometry=(sizes.num_hidden_layers, sizes.num_key_value_heads, sizes.head_dim),
    )


def checked_context(manifest: Manifest, bundle: Bundle) -> int:
    """``llm.context_tokens``, once it is within the model's positions, the tokens the
    export's memory plan budgeted, and this machine's memory for its KV cache (the runtime
    allocates that cache whole, before the first token)."""
    tokens = manifest.value("llm", "context_tokens", kind=int)
    positions = bundle.config.llm.max_position_embeddings
    if tokens > positions:
        raise manifest.corrupt(f"'llm.context_tokens' is {tokens}, beyond the model's {positions} positions")
    plan = manifest.data.get("memory_plan")
    planned = plan.get("context_tokens") if isinstance(plan, dict) else None
    if isinstance(planned, int) and tokens > planned:
        raise manifest.corrupt(f"'llm.context_tokens' is {tokens}, beyond the {planned} tokens its memory plan budgeted")
    sizes = bundle.config.llm  # a key and a value per layer, fp16 (the smallest KV type): a lower bound
    need = tokens * sizes.num_hidden_layers * 2 * sizes.num_key_value_heads * sizes.head_dim * 2
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > physical:
        raise ModelError(
            f"{manifest.path}: a {tokens}-token context needs a KV cache of at least {need / GIB:.1f} GiB, "
            f"more than this machine's {physical / GIB:.1f} GiB of memory",
            "re-run loc3r-export with a smaller --context-tokens",
        )
    return tokens
