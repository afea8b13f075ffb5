"""The pose-retrieval local memory (the reference's ``LocalMemory``, key ``pose_retriever``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loc3r.models.cut3r.blocks import DecoderBlock
from loc3r.models.cut3r.config import Cut3rConfig


class PoseMemory(nn.Module):
    """Slots of [key | value] (width 2 * dec_embed_dim), read and written by decoder blocks.

    Keys come from the mean image token (``proj_q``), values are output pose tokens.
    """

    def __init__(self, config: Cut3rConfig) -> None:
        super().__init__()
        dim, mem_dim = config.dec_embed_dim, config.mem_dim
        self.proj_q = nn.Linear(config.enc_embed_dim, dim)
        self.masked_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mem = nn.Parameter(torch.zeros(1, config.local_mem_size, mem_dim))
        args = (mem_dim, config.dec_num_heads, config.mlp_ratio, config.norm_eps)
        self.write_blocks = nn.ModuleList(DecoderBlock(*args) for _ in range(config.mem_depth))
        self.read_blocks = nn.ModuleList(DecoderBlock(*args) for _ in range(config.mem_depth))

    def read(self, query: Tensor, memory: Tensor) -> Tensor:
        """Pose token (B, 1, dim) retrieved for a mean image token (B, 1, enc_dim)."""
        key = self.proj_q(query)
        x = torch.cat([key, self.masked_token.expand(key.shape[0], -1, -1)], dim=-1)
        for blk in self.read_blocks:
            x = blk(x, memory)
        return x[..., key.shape[-1] :]

    def write(self, memory: Tensor, query: Tensor, pose: Tensor) -> Tensor:
        """New memory after writing the pair (mean image token, output pose token)."""
        feat = torch.cat([self.proj_q(query), pose], dim=-1)
        for blk in self.write_blocks:
            memory = blk(memory, feat)
        return memory
