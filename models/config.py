"""The bundle configuration: every size the model needs, read from ``config.json``.

A bundle is a folder with ``config.json``, safetensors weights and tokenizer files. The
vision tower and LLM sections use the field names of transformers' ``SiglipVisionConfig``
and ``Qwen2Config`` so that they can be handed to those classes unchanged.

Every field is checked against its type and range (declared beside it with :func:`limit`)
and the sections against each other before anything is allocated, so a hostile or damaged
``config.json`` (a width of 1e9, zero heads, a NaN RoPE base, a string for a size) is a
one-line ``ModelError``. Bundle loading then compares every tensor shape with the files'
headers before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loc3r.errors import ModelError

_FIX = "re-create the bundle"


def limit(default: Any, most: float, least: float = 1) -> Any:
    """A dataclass field whose value must lie in ``[least, most]``; for floats ``least``
    is exclusive (``limit(1e-6, 1, least=0)``: above 0, at most 1), and NaN never passes."""
    return field(default=default, metadata={"range": (least, most)})

PoolMode = Literal["bilinear", "average", "max"]
# LLaVA-NeXT's ``mm_newline_position``: after every pooled row, after every frame, once
# after the whole video, or never.
NewlineMode = Literal["grid", "frame", "one_token", "no_token"]
NEWLINE_MODES: tuple[str, ...] = typing.get_args(NewlineMode)
# Whose video token layout the bundle follows: LLaVA-NeXT's (the checkpoint's mm_* settings)
# or transformers' LlavaOnevision (bilinear stride 2, 196 tokens/frame, one newline per video).
VideoLayout = Literal["llava-video", "onevision"]
VIDEO_LAYOUTS: tuple[str, ...] = typing.get_args(VideoLayout)
ONEVISION_VIDEO = ("bilinear", 2, "one_token")  # pool mode, stride, newline position
#: activation names transformers' ``ACT2FN`` maps (listed here so that reading a config does
#: not import transformers; a test checks each is still one of ``ACT2FN``'s)
ACTIVATIONS = frozenset({
    "gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "hardswish",
    "laplace", "leaky_relu", "linear", "mish", "quick_gelu", "relu", "relu2", "relu6", "sigmoid", "silu", "swish", "tanh",
})  # fmt: skip
# dtypes the PyTorch model can run in (``--dtype``; "auto" chooses, see loc3r.models.precision)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
Localization = Literal["trained", "untrained"]
Encoder3D = Literal["cut3r", "vggt"]


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (field names as in transformers' ``SiglipVisionConfig``)."""

    hidden_size: int = limit(1152, 16384)
    intermediate_size: int = limit(4304, 65536)
    num_hidden_layers: int = limit(27, 256)
    num_attention_heads: int = limit(16, 256)
    image_size: int = limit(384, 4096)
    patch_size: int = limit(14, 1024)
    layer_norm_eps: float = limit(1e-6, 1.0, least=0)
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def grid(self) -> int:
        """Patches per side (27 for so400m/14 at 384)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 decoder (field names as in transformers' ``Qwen2Config``)."""

    vocab_size: int = limit(152064, 1 << 21)
    hidden_size: int = limit(3584, 65536)
    intermediate_size: int = limit(18944, 1 << 18)
    num_hidden_layers: int = limit(28, 1024)
    num_attention_heads: int = limit(28, 1024)
    num_key_value_heads: int = limit(4, 1024)
    max_position_embeddings: int = limit(32768, 1 << 21)
    rope_theta: float = limit(1_000_000.0, 1e12, least=0)
    rms_norm_eps: float = limit(1e-6, 1.0, least=0)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class HeadsConfig:
    """Loc3R heads: ``f_cam``, ``f_pos``, ``f_ori``, ``f_bev`` (two-layer GELU MLPs)."""

    hidden_size: int = limit(1024, 65536)
    ori_bins: int = limit(36, 4096)


@dataclass(frozen=True)
class Loc3rConfig:
    """Everything needed to build Loc3R-VLM; serialised as the bundle's ``config.json``."""

    model_id: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    encoder_3d: Encoder3D = "cut3r"
    cut3r: dict[str, Any] = field(default_factory=dict)
    vggt: dict[str, Any] = field(default_factory=dict)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    vision_select_layer: int = limit(-2, 256, least=-257)
    projector_type: str = "mlp2x_gelu"
    spatial_pool_mode: PoolMode = "bilinear"
    spatial_pool_stride: int = limit(2, 64)
    newline_position: NewlineMode = "grid"
    video_layout: VideoLayout = "llava-video"
    num_frames: int = limit(32, 4096)
    cut3r_long_side: int = limit(512, 4096, least=16)
    localization: Localization = "trained"
    random_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Loc3rConfig:
        """Build from a parsed ``config.json``; unknown or missing sections, and values of
        the wrong type, are a ``ModelError``."""
        if not isinstance(data, dict):
            raise ModelError(f"config.json holds a {type(data).__name__}, not an object", _FIX)
        data = dict(data)
        sections = {name: data.pop(name, {}) for name in ("vision", "llm", "heads")}
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise ModelError(f"config.json: {name!r} is not an object", _FIX)
        try:
            vision = VisionConfig(**sections["vision"])
            llm = LLMConfig(**sections["llm"])
            heads = HeadsConfig(**sections["heads"])
            config = cls(vision=vision, llm=llm, heads=heads, **data)
        except TypeError as exc:
            raise ModelError(
                f"config.json has a field this version does not know ({exc})",
                "re-create the bundle with loc3r-convert or check the loc3r version",
            ) from None
        for section, name in ((config, ""), (vision, "vision."), (llm, "llm."), (heads, "heads.")):
            check_field_types(section, name)
        config.validate()
        return config

    def validate(self) -> None:
        """Reject settings the model cannot run (sections that disagree with each other)."""
        from loc3r.models.encoder3d import encoder_config
        from loc3r.models.layout import used_vision_layers

        try:
            check_field_types(encoder_config(self), f"{self.encoder_3d}.")
        except (TypeError, ValueError) as exc:
            raise ModelError(f"config.json: the {self.encoder_3d} section is invalid ({exc})", _FIX) from None
        vision, llm = self.vision, self.llm
        for what, width, heads in (("vision", vision.hidden_size, vision.num_attention_heads), ("llm", llm.hidden_size, llm.num_attention_heads)):
            if width % heads:
                raise ModelError(f"config.json: {what}.hidden_size {width} is not divisible by {heads} attention heads", _FIX)
        if llm.num_attention_heads % llm.num_key_value_heads:
            raise ModelError(
                f"config.json: llm.num_attention_heads {llm.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {llm.num_key_value_heads}", _FIX,
            )
        if llm.head_dim % 2:
            raise ModelError(f"config.json: the LLM head size {llm.head_dim} is odd (RoPE needs an even one)", _FIX)
        if vision.patch_size > vision.image_size or self.spatial_pool_stride > vision.grid:
            raise ModelError(
                f"config.json: vision.patch_size {vision.patch_size} and spatial_pool_stride {self.spatial_pool_stride} "
                f"do not fit a {vision.image_size}-pixel image", _FIX,
            )
        used_vision_layers(vision, self.vision_select_layer)
        for what, act in (("vision", vision.hidden_act), ("llm", llm.hidden_act)):
            if act not in ACTIVATIONS:
                raise ModelError(f"config.json: {what}.hidden_act {act!r} is not an activation transformers knows", _FIX)
        if self.spatial_pool_mode not in ("bilinear", "average", "max"):
            raise ModelError(
                f"config.json: spatial_pool_mode {self.spatial_pool_mode!r} is not supported",
                "use 'bilinear', 'average' or 'max'",
            )
        if self.newline_position not in NEWLINE_MODES:
            raise ModelError(
                f"config.json: newline_position {self.newline_position!r} is not supported",
                f"use one of {', '.join(map(repr, NEWLINE_MODES))}",
            )
        video = (self.spatial_pool_mode, self.spatial_pool_stride, self.newline_position)
        if self.video_layout == "onevision" and video != ONEVISION_VIDEO:
            raise ModelError(
                f"config.json: video_layout 'onevision' needs pooling {ONEVISION_VIDEO}, the config has {video}",
                "re-create the bundle with loc3r-convert --video-layout",
            )
        if self.projector_type != "mlp2x_gelu":
            raise ModelError(
                f"config.json: projector_type {self.projector_type!r} is not supported",
                "use 'mlp2x_gelu'",
            )

    @classmethod
    def load(cls, bundle_dir: str | Path) -> Loc3rConfig:
        path = Path(bundle_dir) / "config.json"
        if not path.is_file():
            raise ModelError(
                f"{bundle_dir} is not a loc3r bundle (no config.json)",
                "pass a folder written by loc3r-convert, or --model tiny",
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ModelError(f"{path} is not valid JSON ({exc})", _FIX) from None
        return cls.from_dict(data)


def check_field_types(section: object, prefix: str = "") -> None:
    """Each field of a config dataclass holds its annotated type, within its :func:`limit`."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, hint = getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            continue  # a section, checked on its own
        least, most = f.metadata.get("range", (None, None))
        if not _has_type(value, hint) or least is not None and not _within(value, hint is float, least, most):
            raise ModelError(f"config.json: {prefix}{f.name} is {value!r}, expected {_wanted(hint, least, most)}", _FIX)


def _within(value: Any, real: bool, least: float, most: float) -> bool:
    """Integers (or a tuple of them) in ``[least, most]``; real numbers finite, in ``(least, most]``."""
    if real:
        return (not isinstance(value, float) or math.isfinite(value)) and least < value <= most
    return all(least <= v <= most for v in (value if isinstance(value, tuple) else (value,)))


def _has_type(value: object, hint: object) -> bool:
    if typing.get_origin(hint) is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        items = typing.get_args(hint)
        return isinstance(value, tuple) and len(value) == len(items) and all(_has_type(v, h) for v, h in zip(value, items))
    return isinstance(value, origin)  # type: ignore[arg-type]


def _wanted(hint: object, least: float | None, most: float | None) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if origin in (int, tuple) and least is not None:
        kind = "an integer" if origin is int else "a pair of integers"
        return f"{kind} from {int(least)} to {int(most)}"
    if origin is float and least is not None:
        return f"a number above {least:g} and at most {most:g}"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false", dict: "an object"}.get(origin, str(hint))  # type: ignore[call-overload]
