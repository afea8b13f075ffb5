"""Target profiles: the hardware, build settings, LLM quantization and encoder precision of each device.

One TOML file per target ships in this package (``engines/<name>.toml``). Every hardware
number carries its source in the file's ``sources`` list; numbers NVIDIA does not publish
directly (dense FP16 tensor TFLOPS of the Orin GPUs) are derived there in ``peak_note``.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from loc3r.errors import InputError, InternalError

Precision = Literal["fp16", "fp32"]
EncoderPrecision = Literal["fp32", "int8"]
WeightFormat = Literal["int4", "int8", "fp16", "fp32"]

#: Short names accepted by :func:`load_target`; ``jetson-orin`` is the AGX Orin 64GB.
ALIASES: dict[str, str] = {"jetson-orin": "jetson-orin-agx"}


@dataclass(frozen=True)
class Hardware:
    """What the device can do; ``peak_tflops`` is the dense rate at the build precision."""

    device: str
    arch: str
    sm: str | None  # CUDA compute capability as ``sm_XY``; None for CPU targets
    memory_gb: float
    reserved_gb: float  # memory the OS / driver keeps (an estimate, see the file)
    bandwidth_gbs: float
    peak_tflops: float
    peak_precision: str
    peak_int8_tops: float | None
    peak_note: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Build:
    """How engines are built for the target."""

    precision: Precision
    trt_version: str | None
    workspace_mib: int | None
    vision_frames: tuple[int, int, int]  # TensorRT optimization profile: min, opt, max
    max_context_tokens: int
    dla: bool
    dla_note: str


@dataclass(frozen=True)
class LLMQuant:
    """Weight format of the LLM's linear layers, its ``lm_head`` and its KV cache."""

    weights: WeightFormat
    block_size: int | None  # quantization block along the input dim; None when unquantized
    lm_head: WeightFormat
    kv_cache: WeightFormat
    prefill_chunk: int  # tokens per prefill call: bounds the transient memory of a long prompt
    note: str


@dataclass(frozen=True)
class Encoders:
    """The encoders' precision (``loc3r-export --encoders``): the default, what the target
    offers, whether int8 needs the user's calibration frames (TensorRT), and why."""

    default: EncoderPrecision  # fp32: the graphs as exported (engines at ``build.precision``)
    available: tuple[EncoderPrecision, ...]
    int8_needs_calibration: bool  # True: int8 is built from ``--calibration VIDEO...`` (static, QDQ)
    note: str


@dataclass(frozen=True)
class Target:
    """A deployment target as read from ``engines/<name>.toml``."""

    name: str
    description: str
    backends: tuple[str, ...]  # preference order
    hardware: Hardware
    build: Build
    llm: LLMQuant
    encoders: Encoders


def list_targets() -> list[str]:
    """Names of the shipped target profiles (aliases excluded), sorted."""
    folder = resources.files("loc3r.engines")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_target(name: str) -> Target:
    """Read one target profile; unknown names raise :class:`InputError` listing valid ones."""
    canonical = ALIASES.get(name, name)
    names = list_targets()
    if canonical not in names:
        valid = ", ".join(names + [f"{a} (= {t})" for a, t in ALIASES.items()])
        raise InputError(f"unknown target {name!r}", f"use one of: {valid}")
    text = resources.files("loc3r.engines").joinpath(f"{canonical}.toml").read_text(encoding="utf-8")
    try:
        return _parse(canonical, tomllib.loads(text))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InternalError(f"target profile {canonical}.toml is malformed ({exc!r})", "reinstall loc3r") from None


def _parse(name: str, data: dict[str, Any]) -> Target:
    hw, build, llm, encoders = data["hardware"], data["build"], data["llm"], data["encoders"]
    available = tuple(encoders["available"])
    if encoders["default"] not in available or not set(available) <= {"fp32", "int8"}:
        raise ValueError(f"encoders: default {encoders['default']!r} must be one of available {available} (fp32, int8)")
    sources = tuple(hw["sources"])
    if not sources:
        raise ValueError("hardware.sources is empty")
    frames = tuple(int(v) for v in build["vision_frames"])
    if len(frames) != 3 or not frames[0] <= frames[1] <= frames[2]:
        raise ValueError(f"build.vision_frames must be [min, opt, max], got {frames}")
    return Target(
        name=name,
        description=data["description"],
        backends=tuple(data["backends"]),
        hardware=Hardware(
            device=hw["device"],
            arch=hw["arch"],
            sm=hw.get("sm"),
            memory_gb=float(hw["memory_gb"]),
            reserved_gb=float(hw["reserved_gb"]),
            bandwidth_gbs=float(hw["memory_bandwidth_gbs"]),
            peak_tflops=float(hw["peak_dense_tflops"]),
            peak_precision=hw["peak_precision"],
            peak_int8_tops=float(hw["peak_dense_int8_tops"]) if "peak_dense_int8_tops" in hw else None,
            peak_note=hw["peak_note"],
            sources=sources,
        ),
        build=Build(
            precision=build["precision"],
            trt_version=build.get("trt_version"),
            workspace_mib=build.get("workspace_mib"),
            vision_frames=frames,  # type: ignore[arg-type]
            max_context_tokens=int(build["max_context_tokens"]),
            dla=bool(build["dla"]),
            dla_note=build["dla_note"],
        ),
        llm=LLMQuant(
            weights=llm["weights"],
            block_size=llm.get("block_size"),
            lm_head=llm["lm_head"],
            kv_cache=llm["kv_cache"],
            prefill_chunk=int(llm["prefill_chunk"]),
            note=llm["note"],
        ),
        encoders=Encoders(
            default=encoders["default"],
            available=available,  # type: ignore[arg-type]
            int8_needs_calibration=bool(encoders["int8_needs_calibration"]),
            note=encoders["note"],
        ),
    )
