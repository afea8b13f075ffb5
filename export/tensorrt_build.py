"""ONNX -> TensorRT plan, on the device that will run it.

TensorRT engines are tied to the GPU (SM) and the TensorRT version, so a Jetson engine is
built on the Jetson, and its file name says for which (``cut3r_step_trt10.3_sm87.engine``).
FP16 is built in one of two ways:

- strongly typed (preferred, every TensorRT 10.x and 11): the FP16 graph written at export
  (``*.fp16.onnx``: FP16 with the precision-sensitive ops and the RoPE tables kept FP32),
  parsed into a ``STRONGLY_TYPED`` network (the flag exists since 10.0, so JetPack 6's 10.3
  has it): TensorRT keeps the graph's types, inside Myelin too.
- pinned (the fallback on TensorRT 10.x, which still has the weak-typing flags; 10.12
  deprecates them and 11 removes them): the FP32 graph, ``BuilderFlag.FP16`` and
  ``OBEY_PRECISION_CONSTRAINTS``, the sensitive layers pinned to FP32 by layer type
  (normalisation, softmax, mean, pow, sqrt, sin, cos) and by the ONNX tensor names of
  ``precision.fp32_nodes`` (RoPE angles and tables). Names alone would pin nothing: the
  dynamo exporter names nodes ``node_layer_norm_3``, not ``LayerNorm``. Per-layer pins can be
  ignored inside Myelin's fused regions, which is why it is not the first choice.

``loc3r-export build`` tries the strongly typed build and, when it fails to build or fails
the accuracy check, falls back to the pinned one where the TensorRT has it.

Everything here that needs TensorRT imports it lazily; the rest (names, profiles, modes,
trtexec lines, refusals) is plain Python and tested without a GPU, the TensorRT calls
against a fake ``tensorrt`` module. Unverified on a real GPU (see docs/status.md).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loc3r.errors import InputError, ModelError

ENGINE_SUFFIX = ".engine"
MANIFEST_NAME = "manifest.json"
# frames of one clip through a whole-clip 3D encoder (vggt_encode): min, opt, max. A live
# sliding window starts with a single frame; 32 is the model's clip; 64 leaves room for --frames.
CLIP_FRAMES = (1, 32, 64)
TIMING_CACHE = "timing.cache"
#: first TensorRT release with NetworkDefinitionCreationFlag.STRONGLY_TYPED
STRONG_TYPING_FROM = (10, 0)
#: first TensorRT release without the weak-typing flags (BuilderFlag.FP16): no pinned fallback
NO_WEAK_TYPING_FROM = (11, 0)

Shape = tuple[int, ...]


class PrecisionMode:
    """How an engine gets its precision (see the module docstring)."""

    FP32 = "fp32"
    FP16_WEAK = "fp16-weakly-typed"
    FP16_STRONG = "fp16-strongly-typed"


def version_tuple(version: str) -> tuple[int, int]:
    """``"10.3.0.30"`` -> (10, 3)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ModelError(f"cannot read the TensorRT version {version!r}", "reinstall TensorRT")
    return int(match[1]), int(match[2])


def precision_mode(trt_version: str, precision: str) -> str:
    """The build mode for ``precision`` with this TensorRT version."""
    if precision == "fp32":
        return PrecisionMode.FP32
    return PrecisionMode.FP16_STRONG if version_tuple(trt_version) >= STRONG_TYPING_FROM else PrecisionMode.FP16_WEAK


def fallback_mode(trt_version: str, mode: str) -> str | None:
    """The mode to try when ``mode`` fails: the pinned build, where TensorRT still has it."""
    if mode == PrecisionMode.FP16_STRONG and version_tuple(trt_version) < NO_WEAK_TYPING_FROM:
        return PrecisionMode.FP16_WEAK
    return None


@dataclass(frozen=True)
class Profile:
    """Min/opt/max shapes of every dynamic input of one graph: one optimisation profile."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def contains(self, shapes: dict[str, Shape]) -> bool:
        """True when every given input shape lies within this profile's bounds."""
        for name, shape in shapes.items():
            if name not in self.shapes:
                continue
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or any(not lo <= d <= hi for lo, d, hi in zip(low, shape, high)):
                return False
        return True

    def describe(self) -> str:
        return ", ".join(f"{name} {_fmt(lo)}..{_fmt(hi)}" for name, (lo, _, hi) in self.shapes.items())

    def trtexec_flags(self) -> list[str]:
        if not self.shapes:
            return []

        def fmt(i: int) -> str:
            return ",".join(f"{name}:{_fmt(s[i])}" for name, s in self.shapes.items())

        return [f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}"]

    def to_dict(self) -> dict[str, list[list[int]]]:
        return {name: [list(s) for s in bounds] for name, bounds in self.shapes.items()}

    @classmethod
    def from_dict(cls, data: dict[str, list[list[int]]]) -> Profile:
        return cls({name: tuple(tuple(int(d) for d in s) for s in bounds) for name, bounds in data.items()})  # type: ignore[misc]


def _fmt(shape: Iterable[int]) -> str:
    return "x".join(map(str, shape))


def resolve_profile(inputs: list[dict[str, Any]], dynamic_sizes: dict[str, tuple[int, int, int]]) -> Profile:
    """Fill each input's named axes with (min, opt, max) from ``dynamic_sizes``."""
    shapes = {}
    for spec in inputs:
        dims = spec["shape"]
        if not any(isinstance(d, str) for d in dims):
            continue
        missing = [d for d in dims if isinstance(d, str) and d not in dynamic_sizes]
        if missing:
            raise ModelError(f"no optimisation range for axis {missing[0]!r} of {spec['name']}", "add it to the target profile")
        shapes[spec["name"]] = tuple(tuple(dynamic_sizes[d][i] if isinstance(d, str) else d for d in dims) for i in range(3))
    return Profile(shapes)


def resolve_profiles(inputs: list[dict[str, Any]], ranges: Sequence[dict[str, tuple[int, int, int]]]) -> list[Profile]:
    """One profile per range set, duplicates dropped (graphs without image axes get one)."""
    profiles: list[Profile] = []
    for sizes in ranges:
        profile = resolve_profile(inputs, sizes)
        if profile not in profiles:
            profiles.append(profile)
    return profiles


def profile_ranges(manifest: dict[str, Any], target: Any) -> list[dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of every named axis: frame batches up to the streaming batch, whole
    clips (``vggt_encode``) of ``CLIP_FRAMES``; for CUT3R's graphs a landscape and a portrait
    range set (square frames are in both), each tuned for 16:9."""
    lo, opt, hi = target.build.vision_frames
    vision_tokens = manifest["artifacts"]["vision"]["outputs"][0]["shape"][1]
    common = {
        "frames": (lo, opt, hi),
        "clip_frames": CLIP_FRAMES,
        "batch": (1, 1, 1),
        # BEV states of every vision token of the frames prefilled at once (newlines left out)
        "tokens": (1, opt * vision_tokens, target.build.max_context_tokens),
    }
    cut3r = manifest.get("cut3r_input")
    if cut3r is None:  # a VGGT export: its image size is fixed
        return [common]
    long, short, patch = cut3r["long_side"], cut3r["min_short_side"], cut3r["patch"]
    opt_short = max(short, long * 9 // 16 // patch * patch)
    common["patches"] = ((short // patch) * (long // patch), (opt_short // patch) * (long // patch), (long // patch) ** 2)
    return [
        {**common, "height": (short, opt_short, long), "width": (long, long, long)},
        {**common, "height": (long, long, long), "width": (short, opt_short, long)},
    ]


def bounding_profile(profiles: Sequence[Profile]) -> Profile:
    """One profile covering several (for ONNX Runtime's TensorRT provider, which takes one)."""
    shapes = {}
    for name in profiles[0].shapes:
        lows, opts, highs = zip(*(p.shapes[name] for p in profiles))
        shapes[name] = (tuple(map(min, zip(*lows))), opts[0], tuple(map(max, zip(*highs))))
    return Profile(shapes)


# -- engine files ---------------------------------------------------------------------------


def engine_file_name(graph: str, trt_version: str, sm: str) -> str:
    """``cut3r_step_trt10.3_sm87.engine``: the engine says which TensorRT and GPU it is for."""
    major, minor = version_tuple(trt_version)
    return f"{graph}_trt{major}.{minor}_sm{sm}{ENGINE_SUFFIX}"


def check_engine_matches(engine: Path, trt_version: str, sm: str) -> None:
    """Refuse an engine built for another TensorRT version or GPU."""
    graph = engine.name.split("_trt")[0]
    wanted = engine_file_name(graph, trt_version, sm)
    if engine.name != wanted:
        raise ModelError(
            f"engine {engine.name} was built for another TensorRT/GPU (this device: TensorRT {trt_version}, sm_{sm})",
            "rebuild the engines on this device with loc3r-export build --manifest",
        )


def import_tensorrt() -> Any:
    """``tensorrt``, or a clear error saying where it comes from."""
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError(
            "TensorRT is not installed here, so engines cannot be built on this machine",
            "run 'loc3r-export build --manifest DIR/manifest.json' on the target device "
            "(JetPack provides TensorRT: create the venv with --system-site-packages; on x86 'pip install loc3r[tensorrt]')",
        ) from None
    return trt


# -- building -------------------------------------------------------------------------------

#: ONNX op type -> the TensorRT layer it becomes (layer type, operation enum member or None)
TRT_LAYERS: dict[str, tuple[str, str | None]] = {
    "LayerNormalization": ("NORMALIZATION", None),
    "Softmax": ("SOFTMAX", None),
    "ReduceMean": ("REDUCE", "AVG"),
    "Pow": ("ELEMENTWISE", "POW"),
    "Sqrt": ("UNARY", "SQRT"),
    "Sin": ("UNARY", "SIN"),
    "Cos": ("UNARY", "COS"),
    "Exp": ("UNARY", "EXP"),
}
#: layer type -> (Python class to read ``op`` from, its operation enum)
_OP_CLASSES = {
    "UNARY": ("IUnaryLayer", "UnaryOperation"),
    "ELEMENTWISE": ("IElementWiseLayer", "ElementWiseOperation"),
    "REDUCE": ("IReduceLayer", "ReduceOperation"),
}
#: layers whose output type is their purpose (casts) or not a float computation
_NEVER_PINNED = ("CAST", "SHAPE", "CONSTANT", "ASSERTION")


@dataclass(frozen=True)
class BuildRequest:
    """One engine to build."""

    onnx_file: Path  # the FP32 graph (weak typing, FP32) or the FP16 graph (strong typing)
    engine_file: Path
    profiles: list[Profile]
    mode: str
    workspace_mib: int
    timing_cache: Path
    fp32_ops: tuple[str, ...] = ()
    fp32_tensors: frozenset[str] = frozenset()


def build_engine(trt: Any, request: BuildRequest) -> bytes:
    """Build one serialised engine with the TensorRT 10/11 Python API (GPU required)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = request.mode == PrecisionMode.FP16_STRONG
    # accepted and ignored by TensorRT 11, where every network is strongly typed
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(request.onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {request.onnx_file.name}: {errors}", "re-export with loc3r-export")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace_mib << 20)
    cache_bytes = request.timing_cache.read_bytes() if request.timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    if request.mode == PrecisionMode.FP16_WEAK:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pin_fp32_layers(trt, network, request.fp32_ops, request.fp32_tensors)
    for profile in request.profiles:
        if not profile.shapes:
            continue
        optimisation = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimisation.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimisation)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelError(f"TensorRT failed to build {request.onnx_file.name}", "see the TensorRT log above; try a larger workspace_mib")
    request.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def pin_fp32_layers(trt: Any, network: Any, fp32_ops: Sequence[str], fp32_tensors: frozenset[str]) -> list[str]:
    """Pin to FP32 every FP32 layer of a sensitive type, or producing a tensor of the FP32
    set; returns the pinned layers' names. Layers the graph itself types otherwise (integer
    shape arithmetic, the FP16 the reference rounds CroCo's RoPE tables to) keep their type."""
    kinds = {TRT_LAYERS[op] for op in fp32_ops if op in TRT_LAYERS}
    pinned = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if layer.type.name in _NEVER_PINNED or not outputs or any(out.dtype != trt.float32 for out in outputs):
            continue
        if not (_layer_kind(trt, layer) in kinds or any(out.name in fp32_tensors for out in outputs)):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


def _layer_kind(trt: Any, layer: Any) -> tuple[str, str | None]:
    """(layer type, operation) as in ``TRT_LAYERS``; the operation read through the layer's
    own class (TensorRT's Python API hands back ``ILayer``: reassigning ``__class__`` is its
    documented way to reach a subclass's members)."""
    kind = layer.type.name
    if kind not in _OP_CLASSES:
        return kind, None
    class_name, _ = _OP_CLASSES[kind]
    layer.__class__ = getattr(trt, class_name)
    return kind, layer.op.name


# -- the plan written at export -------------------------------------------------------------


def trtexec_command(onnx_file: Path, engine_file: Path, profiles: Sequence[Profile], strongly_typed: bool, workspace_mib: int) -> str:
    """The equivalent ``trtexec`` line, for users who build by hand (repeated shape flags
    make several profiles). FP16 uses the FP16 graph, strongly typed: valid from TensorRT
    10.0 to 11 (the weakly typed per-layer pins of ``loc3r-export build`` have no trtexec form)."""
    args = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}"]
    for profile in profiles:
        args += profile.trtexec_flags()
    args += [f"--memPoolSize=workspace:{workspace_mib}M", f"--timingCacheFile={TIMING_CACHE}", "--skipInference"]
    if strongly_typed:
        args.append("--stronglyTyped")
    return shlex.join(args)


def device_build_plan(manifest: dict[str, Any], target: Any) -> dict[str, Any] | None:
    """How the target device turns the ONNX files into engines (None for ONNX-only targets).

    Engine names here carry the target's TensorRT version and SM; ``loc3r-export build``
    names them by the TensorRT and GPU it actually finds.
    """
    build = target.build
    if build.trt_version is None or target.hardware.sm is None:
        return None
    sm = target.hardware.sm.removeprefix("sm_")
    ranges = profile_ranges(manifest, target)
    fp16 = build.precision == "fp16"
    engines = {}
    for name, artifact in manifest["artifacts"].items():
        profiles = resolve_profiles(artifact["inputs"], ranges)
        engine = engine_file_name(name, build.trt_version, sm)
        source = artifact["fp16"]["file"] if fp16 else artifact["file"]
        engines[name] = {
            "onnx": artifact["file"],
            "engine": engine,
            "profiles": [p.to_dict() for p in profiles],
            "trtexec": trtexec_command(Path(source), Path(engine), profiles, fp16, build.workspace_mib or 1024),
        }
    return {
        "status": "pending: engines are built on the target device",
        "command": f"loc3r-export build --manifest {MANIFEST_NAME}",
        "trt_version": build.trt_version,
        "sm": sm,
        "precision": build.precision,
        "workspace_mib": build.workspace_mib,
        "engines": engines,
        "llm": "runs through onnxruntime-gpu (CUDA EP); no TensorRT engine",
    }
