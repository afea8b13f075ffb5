"""Loc3R heads: camera-token projection and the localization / layout read-outs.

- ``f_cam``: CUT3R camera token (768) -> LLM width, prepended to each frame's tokens.
- ``f_pos``: ``<Pos>`` last hidden state -> (x, y) metres in the BEV frame and log sigma.
- ``f_ori``: ``<Ori>`` last hidden state -> orientation-bin logits; the angle is the
  circular soft-argmax ``atan2(sum p_b sin t_b, sum p_b cos t_b)``.
- ``f_bev``: each vision token's last hidden state -> its (x, y) on the BEV layout map.

Bin ``b`` of ``B`` is centred at ``t_b = -pi + (b + 0.5) * 2 pi / B``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from loc3r.models.config import Loc3rConfig


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Two linear layers with a GELU between (keys ``0.*`` and ``2.*``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def orientation_bin_centres(num_bins: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Angles (radians) at the centre of each orientation bin, in (-pi, pi)."""
    step = 2.0 * math.pi / num_bins
    return -math.pi + (torch.arange(num_bins, dtype=dtype) + 0.5) * step


def circular_soft_argmax(logits: Tensor) -> Tensor:
    """Expected angle on the circle under softmax(logits) over the last axis, in (-pi, pi]."""
    probs = torch.softmax(logits.float(), dim=-1)
    centres = orientation_bin_centres(logits.shape[-1]).to(logits.device)
    sin = (probs * torch.sin(centres)).sum(-1)
    cos = (probs * torch.cos(centres)).sum(-1)
    return torch.atan2(sin, cos)


class Loc3rHeads(nn.Module):
    """``f_cam``, ``f_pos``, ``f_ori`` and ``f_bev`` of one model."""

    def __init__(self, config: Loc3rConfig, camera_dim: int) -> None:
        super().__init__()
        width, hidden = config.llm.hidden_size, config.heads.hidden_size
        self.f_cam = mlp(camera_dim, width, width)
        self.f_pos = mlp(width, hidden, 3)
        self.f_ori = mlp(width, hidden, config.heads.ori_bins)
        self.f_bev = mlp(width, hidden, 2)

    def project_camera(self, camera_tokens: Tensor) -> Tensor:
        """(..., camera_dim) -> (..., LLM width)."""
        return self.f_cam(camera_tokens)

    def pose(self, pos_state: Tensor, ori_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``<Pos>``/``<Ori>`` states (..., width) -> xy (..., 2), sigma (...), theta (...)."""
        out = self.f_pos(pos_state)
        xy, sigma = out[..., :2], torch.exp(out[..., 2])
        theta = circular_soft_argmax(self.f_ori(ori_state))
        return xy, sigma, theta

    def bev(self, vision_states: Tensor) -> Tensor:
        """Vision-token states (..., width) -> BEV points (..., 2) in metres."""
        return self.f_bev(vision_states)
