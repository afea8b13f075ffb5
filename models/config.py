"""The bundle configuration: every size the model needs, read from ``config.json``.

A bundle is a folder with ``config.json``, safetensors weights and tokenizer files. The
vision tower and LLM sections use the field names of transformers' ``SiglipVisionConfig``
and ``Qwen2Config`` so that they can be handed to those classes unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loc3r.errors import ModelError

SIGNED_FIELDS = {"vision_select_layer"}  # the only integers that may be zero or negative

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
# dtypes the PyTorch model can run in (``--dtype``; "auto" chooses, see loc3r.models.precision)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
Localization = Literal["trained", "untrained"]


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (field names as in transformers' ``SiglipVisionConfig``)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def grid(self) -> int:
        """Patches per side (27 for so400m/14 at 384)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 decoder (field names as in transformers' ``Qwen2Config``)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class HeadsConfig:
    """Loc3R heads: ``f_cam``, ``f_pos``, ``f_ori``, ``f_bev`` (two-layer GELU MLPs)."""

    hidden_size: int = 1024
    ori_bins: int = 36


@dataclass(frozen=True)
class Loc3rConfig:
    """Everything needed to build Loc3R-VLM; serialised as the bundle's ``config.json``."""

    model_id: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    cut3r: dict[str, Any] = field(default_factory=dict)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    vision_select_layer: int = -2
    projector_type: str = "mlp2x_gelu"
    spatial_pool_mode: PoolMode = "bilinear"
    spatial_pool_stride: int = 2
    newline_position: NewlineMode = "grid"
    video_layout: VideoLayout = "llava-video"
    num_frames: int = 32
    cut3r_long_side: int = 512
    localization: Localization = "trained"
    random_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Loc3rConfig:
        """Build from a parsed ``config.json``; unknown or missing sections, and values of
        the wrong type, are a ``ModelError``."""
        if not isinstance(data, dict):
            raise ModelError(f"config.json holds a {type(data).__name__}, not an object", "re-create the bundle")
        data = dict(data)
        sections = {name: data.pop(name, {}) for name in ("vision", "llm", "heads")}
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise ModelError(f"config.json: {name!r} is not an object", "re-create the bundle")
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
        """Reject settings the model cannot run."""
        from loc3r.models.cut3r.config import Cut3rConfig

        try:
            Cut3rConfig.from_dict(self.cut3r)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"config.json: the cut3r section is invalid ({exc})", "re-create the bundle") from None
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
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path} is not valid JSON ({exc})", "re-create the bundle") from None
        return cls.from_dict(data)


def check_field_types(section: object, prefix: str = "") -> None:
    """Each field of a config dataclass holds its annotated type (ints >= 1 for sizes)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, hint = getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            continue  # a section, checked on its own
        if not _has_type(value, hint) or (hint is int and f.name not in SIGNED_FIELDS and value < 1):
            wanted = _type_name(hint) if hint is not int else "an integer" if f.name in SIGNED_FIELDS else "a positive integer"
            raise ModelError(f"config.json: {prefix}{f.name} is {value!r}, expected {wanted}", "re-create the bundle")


def _has_type(value: object, hint: object) -> bool:
    if typing.get_origin(hint) is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)  # type: ignore[arg-type]


def _type_name(hint: object) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    return {float: "a number", str: "a string", bool: "true or false", dict: "an object"}.get(origin, str(hint))  # type: ignore[call-overload]
