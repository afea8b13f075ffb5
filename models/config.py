"""The bundle configuration: every size the model needs, read from ``config.json``.

A bundle is a folder with ``config.json``, safetensors weights and tokenizer files. The
vision tower and LLM sections use the field names of transformers' ``SiglipVisionConfig``
and ``Qwen2Config`` so that they can be handed to those classes unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loc3r.errors import ModelError

PoolMode = Literal["bilinear", "average", "max"]
NewlineMode = Literal["grid", "no_token"]
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
    num_frames: int = 32
    cut3r_long_side: int = 512
    localization: Localization = "trained"
    random_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Loc3rConfig:
        """Build from a parsed ``config.json``; unknown or missing sections are an error."""
        data = dict(data)
        try:
            vision = VisionConfig(**data.pop("vision", {}))
            llm = LLMConfig(**data.pop("llm", {}))
            heads = HeadsConfig(**data.pop("heads", {}))
            config = cls(vision=vision, llm=llm, heads=heads, **data)
        except TypeError as exc:
            raise ModelError(
                f"config.json has a field this version does not know ({exc})",
                "re-create the bundle with loc3r-convert or check the loc3r version",
            ) from None
        config.validate()
        return config

    def validate(self) -> None:
        """Reject settings the model cannot run."""
        if self.spatial_pool_mode not in ("bilinear", "average", "max"):
            raise ModelError(
                f"config.json: spatial_pool_mode {self.spatial_pool_mode!r} is not supported",
                "use 'bilinear', 'average' or 'max'",
            )
        if self.newline_position not in ("grid", "no_token"):
            raise ModelError(
                f"config.json: newline_position {self.newline_position!r} is not supported",
                "use 'grid' or 'no_token'",
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
