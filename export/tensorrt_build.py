"""ONNX -> TensorRT plan, on the device that will run it.

TensorRT engines are tied to the GPU (SM) and the TensorRT version, so a Jetson engine
is built on the Jetson. Everything here that needs TensorRT imports it lazily; the parts
that do not (engine names, optimisation profiles, trtexec command lines) are plain
Python and tested without a GPU.

Unverified here: no GPU or TensorRT is available to this project's CI; the code follows
the TensorRT 10 Python API (OnnxParser, optimisation profiles, BuilderFlag.FP16, timing
cache, workspace pool limit) and must be exercised on a device before release.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loc3r.errors import InputError, ModelError

ENGINE_SUFFIX = ".engine"
MANIFEST_NAME = "manifest.json"
# frames of one clip through a whole-clip 3D encoder (vggt_encode): min, opt, max. A live
# sliding window starts with a single frame; 32 is the model's clip; 64 leaves room for --frames.
CLIP_FRAMES = (1, 32, 64)


@dataclass(frozen=True)
class Profile:
    """Min/opt/max shapes of every dynamic input of one graph."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def trtexec_flags(self) -> list[str]:
        if not self.shapes:
            return []

        def fmt(i: int) -> str:
            return ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in self.shapes.items())

        return [f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}"]


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
        shapes[spec["name"]] = tuple(
            tuple(dynamic_sizes[d][i] if isinstance(d, str) else d for d in dims) for i in range(3)
        )
    return Profile(shapes)


def engine_file_name(graph: str, trt_version: str, sm: str) -> str:
    """``cut3r_step_trt10.3_sm87.engine``: the engine says which TensorRT and GPU it is for."""
    major_minor = ".".join(trt_version.split(".")[:2])
    return f"{graph}_trt{major_minor}_sm{sm}{ENGINE_SUFFIX}"


def check_engine_matches(engine: Path, trt_version: str, sm: str) -> None:
    """Refuse an engine built for another TensorRT version or GPU."""
    graph = engine.name.split("_trt")[0]
    wanted = engine_file_name(graph, trt_version, sm)
    if engine.name != wanted:
        raise ModelError(
            f"engine {engine.name} was built for another TensorRT/GPU (this device: TensorRT {trt_version}, sm_{sm})",
            "rebuild the engines on this device with loc3r-export build --manifest",
        )


def trtexec_command(onnx_file: Path, engine_file: Path, profile: Profile, fp16: bool, workspace_mib: int, timing_cache: Path) -> str:
    """The equivalent ``trtexec`` line, for users who build by hand."""
    args = [
        "trtexec",
        f"--onnx={onnx_file}",
        f"--saveEngine={engine_file}",
        *profile.trtexec_flags(),
        f"--memPoolSize=workspace:{workspace_mib}M",
        f"--timingCacheFile={timing_cache}",
        "--skipInference",
    ]
    if fp16:
        args += ["--fp16", "--precisionConstraints=obey", "--layerPrecisions=*LayerNorm*:fp32,*Softmax*:fp32"]
    return shlex.join(args)


def import_tensorrt() -> Any:
    """``tensorrt``, or a clear error saying where it comes from."""
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError(
            "TensorRT is not installed here, so engines cannot be built on this machine",
            "run 'loc3r-export build --manifest DIR/manifest.json' on the target device "
            "(JetPack provides TensorRT; on x86 'pip install loc3r[tensorrt]')",
        ) from None
    return trt


def cuda_device_sm() -> str:
    """Compute capability of GPU 0 as ``87``, or an error when there is no CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        raise InputError("no CUDA GPU is visible", "build engines on the target device, which has one")
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}"


def build_engine(
    onnx_file: Path,
    engine_file: Path,
    profile: Profile,
    fp16: bool,
    workspace_mib: int,
    timing_cache: Path,
    fp32_ops: tuple[str, ...] = (),
) -> Path:
    """Build and serialise one engine with the TensorRT 10 Python API (GPU required)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_file.name}: {errors}", "re-export with loc3r-export")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pin_fp32_layers(network, trt, fp32_ops)
    if profile.shapes:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.shapes.items():
            opt.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelError(f"TensorRT failed to build {onnx_file.name}", "see the TensorRT log above; try a larger workspace")
    engine_file.write_bytes(bytes(plan))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_file


def pin_fp32_layers(network: Any, trt: Any, fp32_ops: tuple[str, ...]) -> None:
    """Keep precision-sensitive layers (normalisation, softmax, RoPE trig) in FP32."""
    keywords = tuple(op.lower() for op in fp32_ops)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(k in layer.name.lower() for k in keywords):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def dynamic_ranges(manifest: dict[str, Any], target: Any) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named axis, from the target's frame range."""
    lo, opt, hi = target.build.vision_frames
    vision_tokens = manifest["artifacts"]["vision"]["outputs"][0]["shape"][1]
    return {
        "frames": (lo, opt, hi),
        "clip_frames": CLIP_FRAMES,
        "batch": (1, 1, 8),
        "tokens": (vision_tokens, opt * vision_tokens, hi * vision_tokens),
    }


def device_build_plan(manifest: dict[str, Any], target: Any) -> dict[str, Any] | None:
    """How the target device turns the ONNX files into engines (None for ONNX-only targets)."""
    build = target.build
    if build.trt_version is None or target.hardware.sm is None:
        return None
    sm = target.hardware.sm.removeprefix("sm_")
    ranges = dynamic_ranges(manifest, target)
    engines = {}
    for name, artifact in manifest["artifacts"].items():
        profile = resolve_profile(artifact["inputs"], ranges)
        engine = engine_file_name(name, build.trt_version, sm)
        engines[name] = {
            "onnx": artifact["file"],
            "engine": engine,
            "profile": {k: [list(s) for s in v] for k, v in profile.shapes.items()},
            "fp32_ops": artifact.get("fp32_ops", []),
            "trtexec": trtexec_command(
                Path(artifact["file"]), Path(engine), profile, build.precision == "fp16", build.workspace_mib or 1024, Path("timing.cache")
            ),
        }
    return {
        "status": "pending: engines are built on the target device",
        "command": f"loc3r-export build --manifest {MANIFEST_NAME}",
        "trt_version": build.trt_version,
        "sm": sm,
        "precision": build.precision,
        "workspace_mib": build.workspace_mib,
        "engines": engines,
        "llm": "runs through onnxruntime-gpu (CUDA EP, MatMulNBits int4); no TensorRT engine",
    }
