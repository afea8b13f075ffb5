"""2D rotary position embedding (CroCo's RoPE2D), with angles computed as pos * inv_freq.

Positions are (row, col) pairs as float tensors. The first half of each head's features
rotates with the row, the second half with the column. The angle is computed directly
from the position (no table lookup), so the pose token's position -1 works and the
graph has no gather that an exporter could get wrong.
"""

from __future__ import annotations

import torch
from torch import Tensor

RopeTables = tuple[Tensor, Tensor]


def patch_positions(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(height*width, 2) float positions (row, col) of a patch grid, row-major."""
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    return torch.stack(
        [rows[:, None].expand(height, width), cols[None, :].expand(height, width)], dim=-1
    ).reshape(-1, 2)


def state_positions(state_size: int, mode: str) -> Tensor:
    """(state_size, 2) positions of the state tokens: ``2d`` grid of even width or ``1d`` (i, i)."""
    index = torch.arange(state_size, dtype=torch.float32)
    if mode == "1d":
        return torch.stack([index, index], dim=-1)
    width = int(state_size**0.5)
    width += width % 2
    return torch.stack([torch.div(index, width, rounding_mode="floor"), index % width], dim=-1)


def rope_tables(positions: Tensor, head_dim: int, freq: float, dtype: torch.dtype) -> RopeTables:
    """cos and sin tables (..., 1, N, head_dim) in ``dtype`` for positions (..., N, 2).

    The angle is formed in float32 and rounded to ``dtype`` before cos/sin, as the
    reference does when it builds its tables in the tokens' dtype.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (freq ** (torch.arange(0, half, 2, device=positions.device).float() / half))
    parts_cos, parts_sin = [], []
    for axis in range(2):
        angle = positions[..., axis, None].float() * inv_freq
        angle = torch.cat([angle, angle], dim=-1).to(dtype).float()
        parts_cos.append(angle.cos().to(dtype))
        parts_sin.append(angle.sin().to(dtype))
    cos = torch.cat(parts_cos, dim=-1).unsqueeze(-3)
    sin = torch.cat(parts_sin, dim=-1).unsqueeze(-3)
    return cos, sin


def _rotate_halves(x: Tensor) -> Tensor:
    """Within each axis half [a, b] -> [-b, a] (CroCo's rotate_half per axis)."""
    q = x.shape[-1] // 4
    y1, y2, x1, x2 = x.split(q, dim=-1)
    return torch.cat([-y2, y1, -x2, x1], dim=-1)


def apply_rope(x: Tensor, tables: RopeTables) -> Tensor:
    """Rotate (B, heads, N, head_dim) features; computed in the tables' dtype, returned in x's."""
    cos, sin = tables
    xr = x.to(cos.dtype)
    return (xr * cos + _rotate_halves(xr) * sin).to(x.dtype)
