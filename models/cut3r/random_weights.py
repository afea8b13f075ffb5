"""Reproducible random weights: one generator per tensor, seeded from (seed, key).

Any subset of keys can be rebuilt on its own, so tests and the fixture script (which
applies the same weights to the reference model) agree without storing 2 GB of weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection

import torch
from torch import Tensor

from loc3r.models.cut3r.config import Cut3rConfig
from loc3r.models.cut3r.encoder import Cut3rCameraEncoder

_TOKENS = (
    "pose_token",
    "register_tokens.weight",
    "pose_retriever.mem",
    "pose_retriever.masked_token",
)


def random_tensor(key: str, shape: tuple[int, ...], seed: int, tokens: Collection[str] = _TOKENS) -> Tensor:
    """Deterministic float32 tensor for ``key``: LayerNorm weights near 1, small biases,
    unit-variance learned tokens (the keys in ``tokens``), fan-in scaled matrices."""
    gen = torch.Generator().manual_seed((seed + zlib.crc32(key.encode())) % 2**63)
    noise = torch.randn(shape, generator=gen)
    if key in tokens:
        return noise
    if key.endswith(".bias"):
        return 0.02 * noise
    if len(shape) == 1:
        return 1.0 + 0.1 * noise
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return noise * fan_in**-0.5


def random_state_dict(config: Cut3rConfig, seed: int) -> dict[str, Tensor]:
    """Random weights for every parameter of ``Cut3rCameraEncoder(config)``."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Cut3rCameraEncoder(config).state_dict().items()}
    return {k: random_tensor(k, shape, seed) for k, shape in shapes.items()}
