"""Reproducible random VGGT weights (one generator per tensor, as for CUT3R): tests and fixtures."""

from __future__ import annotations

import torch
from torch import Tensor

from loc3r.models.cut3r.random_weights import random_tensor
from loc3r.models.vggt.config import VggtConfig
from loc3r.models.vggt.encoder import VggtCameraEncoder

TOKENS = (
    "camera_token",
    "register_token",
    "patch_embed.cls_token",
    "patch_embed.pos_embed",
    "patch_embed.register_tokens",
)


def random_state_dict(config: VggtConfig, seed: int) -> dict[str, Tensor]:
    """Random weights for every parameter of ``VggtCameraEncoder(config)`` (aggregator names)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VggtCameraEncoder(config).state_dict().items()}
    return {k: random_tensor(k, shape, seed, TOKENS) for k, shape in shapes.items()}
