"""Sizes of VGGT's camera-token path: the DINOv2 patch embedding and the aggregator."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loc3r.errors import ModelError
from loc3r.models.config import check_field_types, limit

DINO_HEAD_DIM = 64  # every DINOv2 ViT (S/B/L/g) has 64-wide heads; the checkpoint does not say


@dataclass(frozen=True)
class VggtConfig:
    """Every size the camera path needs; defaults are facebook/VGGT-1B.

    The patch embedding is a DINOv2 ViT with register tokens at the aggregator's width
    (``patch_embed_depth`` blocks, ``embed_dim // 64`` heads); the aggregator has ``depth``
    frame blocks and ``depth`` global blocks. ``img_size`` is the training resolution: it
    sizes the learned position embedding (``(img_size / patch_size)^2`` patches) and is the
    width frames are resized to.
    """

    embed_dim: int = limit(1024, 16384)
    depth: int = limit(24, 256)
    num_heads: int = limit(16, 256)
    patch_embed_depth: int = limit(24, 256)
    mlp_ratio: float = limit(4.0, 64.0, least=0)
    num_register_tokens: int = limit(4, 256, least=0)
    patch_size: int = limit(14, 1024)
    img_size: int = limit(518, 16384)
    rope_freq: float = limit(100.0, 1e9, least=0)

    def __post_init__(self) -> None:
        check_field_types(self, "vggt.")  # types and ranges first: no division by a zero below
        for heads, what in ((self.num_heads, "aggregator"), (self.patch_embed_heads, "patch embedding")):
            if heads < 1 or self.embed_dim % heads or (self.embed_dim // heads) % 4:
                raise ModelError(
                    f"VGGT {what} width {self.embed_dim} with {heads} heads gives a head size that is not a multiple of 4",
                    "2D RoPE needs head_dim % 4 == 0; fix the config",
                )
        if self.img_size % self.patch_size:
            raise ModelError(f"VGGT img_size {self.img_size} is not a multiple of patch_size {self.patch_size}", "fix the config")

    @property
    def patch_embed_heads(self) -> int:
        return max(self.embed_dim // DINO_HEAD_DIM, 1)

    @property
    def camera_dim(self) -> int:
        """Width of the camera token the camera head reads: frame and global outputs side by side."""
        return 2 * self.embed_dim

    @property
    def grid(self) -> int:
        """Patches per side of the learned position embedding (37 at 518 / 14)."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VggtConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ModelError(f"unknown VGGT config fields {unknown}", "remove them")
        return cls(**data)

    @classmethod
    def tiny(cls) -> VggtConfig:
        """Small random-weight model for tests and demos (head size 64, 224-pixel training size)."""
        return cls(embed_dim=128, depth=2, num_heads=2, patch_embed_depth=2, img_size=224)

    @classmethod
    def real_width(cls) -> VggtConfig:
        """VGGT-1B's widths, heads, registers and 518 geometry at two blocks per stack (parity tests)."""
        return cls(depth=2, patch_embed_depth=2)
