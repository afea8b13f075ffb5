"""VGGT's patch embedding: a DINOv2 ViT with register tokens; its normalised patch tokens.

Per image: 14x14 patch conv, a class token, the learned position embedding (bicubic,
antialiased resize from the training grid when the image grid differs), register tokens
after the class token, pre-norm blocks with layer scale, final LayerNorm (eps 1e-6). The
class and register outputs are dropped; the aggregator adds its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loc3r.models.cut3r.blocks import PatchEmbed
from loc3r.models.vggt.blocks import Block
from loc3r.models.vggt.config import VggtConfig

NORM_EPS = 1e-6


class DinoPatchEmbed(nn.Module):
    """DINOv2 ViT as VGGT's ``aggregator.patch_embed`` (names as in the checkpoint)."""

    def __init__(self, config: VggtConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.grid = config.grid
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.patch_embed_heads, config.mlp_ratio, NORM_EPS, qk_norm=False)
            for _ in range(config.patch_embed_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)

    def position_embedding(self, height: int, width: int) -> Tensor:
        """(1, 1 + height * width, dim): the class token's and the patch grid's, resized if needed."""
        if (height, width) == (self.grid, self.grid):
            return self.pos_embed
        table = self.pos_embed.float()
        grid = table[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, height * width, -1)
        return torch.cat([table[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def forward(self, images: Tensor, pos_embed: Tensor | None = None) -> Tensor:
        """Normalised images (N, 3, H, W) -> patch tokens (N, H/p * W/p, dim).

        ``pos_embed`` (from ``position_embedding``) may be given precomputed, e.g. as a
        constant of an exported graph with a fixed image size.
        """
        x, height, width = self.patch_embed(images)
        if pos_embed is None:
            pos_embed = self.position_embedding(height, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed
        x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.register_tokens.shape[1] :]
