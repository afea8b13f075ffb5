"""VGGT camera-token encoder: the aggregator of ``facebookresearch/vggt`` up to its camera token.

Frames of one clip are patch-embedded independently (DINOv2), each gets a camera token and
register tokens (frame 0 its own pair, the other frames a shared second pair), and
``depth`` rounds of frame attention (within each frame) then global attention (over every
token of the clip) follow, both with 2D RoPE on the patch grid (special tokens at
position 0, patches from 1). The camera token of a frame is what VGGT's camera head reads:
token 0 of the last frame block's output beside token 0 of the last global block's, so
``camera_dim`` is twice the width. Unlike CUT3R it sees the whole clip at once: every
token depends on every frame.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loc3r.errors import InputError
from loc3r.models.cut3r.rope import patch_positions, rope_tables
from loc3r.models.vggt.blocks import Block
from loc3r.models.vggt.config import VggtConfig
from loc3r.models.vggt.dinov2 import DinoPatchEmbed

NORM_EPS = 1e-5
RESNET_MEAN = (0.485, 0.456, 0.406)
RESNET_STD = (0.229, 0.224, 0.225)


class VggtCameraEncoder(nn.Module):
    """``aggregator.*`` of VGGT, parameter names as in the checkpoint without that prefix."""

    streaming = False  # needs the whole clip: see ``encode``

    def __init__(self, config: VggtConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = DinoPatchEmbed(c)
        self.frame_blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, NORM_EPS, qk_norm=True) for _ in range(c.depth))
        self.global_blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, NORM_EPS, qk_norm=True) for _ in range(c.depth))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, c.num_register_tokens, c.embed_dim))
        self.skipped_keys: tuple[str, ...] = ()

    @property
    def camera_dim(self) -> int:
        return self.config.camera_dim

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """One clip (T, 3, H, W) in [0, 1], in order -> camera tokens (T, camera_dim)."""
        p = self.config.patch_size
        if frames.ndim != 4 or len(frames) == 0 or frames.shape[1] != 3 or frames.shape[2] % p or frames.shape[3] % p:
            raise InputError(
                f"VGGT expects a clip (T>0, 3, H, W) with H, W multiples of {p}, got {tuple(frames.shape)}",
                "resize or crop the frames",
            )
        return self(frames[None])[0]

    def forward(self, images: Tensor, pos_embed: Tensor | None = None) -> Tensor:
        """Clips (B, S, 3, H, W) in [0, 1] -> camera tokens (B, S, camera_dim).

        ``pos_embed``: the patch embedding's position table for this image size, when
        precomputed (see ``DinoPatchEmbed.forward``).
        """
        c = self.config
        batch, frames, _, height, width = images.shape
        mean, std = (images.new_tensor(v).reshape(1, 3, 1, 1) for v in (RESNET_MEAN, RESNET_STD))
        x = (images.flatten(0, 1) - mean) / std
        patches = self.patch_embed(x, pos_embed)
        tokens = torch.cat([self._special_tokens(batch, frames), patches], dim=1)
        per_frame = tokens.shape[1]
        special = torch.zeros(1 + c.num_register_tokens, 2)
        positions = torch.cat([special, patch_positions(height // c.patch_size, width // c.patch_size) + 1])
        rope_frame = rope_tables(positions.to(images.device), c.embed_dim // c.num_heads, c.rope_freq, torch.float32)
        rope_global = tuple(t.repeat(1, frames, 1) for t in rope_frame)
        for frame_block, global_block in zip(self.frame_blocks, self.global_blocks, strict=True):
            frame_out = frame_block(tokens.reshape(batch * frames, per_frame, -1), rope_frame)
            tokens = global_block(frame_out.reshape(batch, frames * per_frame, -1), rope_global)
        frame_camera = frame_out.reshape(batch, frames, per_frame, -1)[:, :, 0]
        global_camera = tokens.reshape(batch, frames, per_frame, -1)[:, :, 0]
        return torch.cat([frame_camera, global_camera], dim=-1)

    def _special_tokens(self, batch: int, frames: int) -> Tensor:
        """(B * S, 1 + registers, dim): frame 0 takes the first camera/register pair, the rest the second."""
        pair = torch.cat([self.camera_token, self.register_token], dim=2)[0]  # (2, 1 + R, dim)
        first = torch.arange(frames, device=pair.device) == 0
        tokens = torch.where(first[:, None, None], pair[0], pair[1])
        return tokens.expand(batch, -1, -1, -1).flatten(0, 1)
