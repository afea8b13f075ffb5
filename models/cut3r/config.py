"""Sizes of the CUT3R camera-token path (the parts of ``ARCroco3DStereo`` that we keep)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from loc3r.errors import ModelError
from loc3r.models.config import check_field_types, limit

StatePE = Literal["1d", "2d"]


@dataclass(frozen=True)
class Cut3rConfig:
    """Every size the camera path needs; names follow the reference's config arguments.

    ``img_size`` and ``head_type`` record the checkpoint's training resolution and head;
    the camera path accepts any H, W that are multiples of ``patch_size``.
    """

    enc_embed_dim: int = limit(1024, 16384)
    enc_depth: int = limit(24, 256)
    enc_num_heads: int = limit(16, 256)
    dec_embed_dim: int = limit(768, 16384)
    dec_depth: int = limit(12, 256)
    dec_num_heads: int = limit(12, 256)
    state_size: int = limit(768, 65536)
    state_dec_num_heads: int = limit(16, 256)
    state_pe: StatePE = "2d"
    local_mem_size: int = limit(256, 65536)
    mem_depth: int = limit(2, 64)
    patch_size: int = limit(16, 1024)
    rope_freq: float = limit(100.0, 1e9, least=0)
    mlp_ratio: float = limit(4.0, 64.0, least=0)
    norm_eps: float = limit(1e-6, 1.0, least=0)
    img_size: tuple[int, int] = limit((512, 512), 16384)
    head_type: str = "dpt"

    def __post_init__(self) -> None:
        check_field_types(self, "cut3r.")  # types and ranges first: no division by a zero below
        for dim, heads, what in (
            (self.enc_embed_dim, self.enc_num_heads, "encoder"),
            (self.dec_embed_dim, self.dec_num_heads, "decoder"),
            (self.dec_embed_dim, self.state_dec_num_heads, "state decoder"),
        ):
            if dim % heads or (dim // heads) % 4:
                raise ModelError(
                    f"CUT3R {what} width {dim} with {heads} heads gives a head size that is "
                    "not a multiple of 4",
                    "2D RoPE needs head_dim % 4 == 0; fix the config",
                )
        if self.state_pe not in ("1d", "2d"):
            raise ModelError(f"unsupported CUT3R state_pe {self.state_pe!r}", "use '1d' or '2d'")

    @property
    def mem_dim(self) -> int:
        """Width of one pose-memory slot (key and value halves)."""
        return 2 * self.dec_embed_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cut3rConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ModelError(f"unknown CUT3R config fields {unknown}", "remove them")
        d = dict(d)
        if isinstance(d.get("img_size"), list):
            d["img_size"] = tuple(d["img_size"])
        return cls(**d)

    @classmethod
    def tiny(cls) -> Cut3rConfig:
        """Small random-weight model for tests and demos (head size 64)."""
        return cls(
            enc_embed_dim=128,
            enc_depth=2,
            enc_num_heads=2,
            dec_embed_dim=128,
            dec_depth=2,
            dec_num_heads=2,
            state_size=16,
            state_dec_num_heads=2,
            local_mem_size=8,
            img_size=(224, 224),
            head_type="linear",
        )

    @classmethod
    def real_224_linear(cls) -> Cut3rConfig:
        """``cut3r_224_linear_4.pth`` (config/linear_224_fixed_16.yaml)."""
        return cls(img_size=(224, 224), head_type="linear")

    @classmethod
    def real_512_dpt(cls) -> Cut3rConfig:
        """``cut3r_512_dpt_4_64.pth`` (config/dpt_512_vary_4_64.yaml)."""
        return cls(img_size=(512, 512), head_type="dpt")
