"""Transformer blocks of CroCo/DUSt3R with their parameter names (attn.qkv, cross_attn.projq, ...).

RoPE precision follows the tables handed in: the encoder passes float16 tables (CroCo
rounds q and k to float16 before RoPE even in fp32 runs), the decoders pass float32 ones.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from loc3r.models.cut3r.rope import RopeTables, apply_rope


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def first_rows(rope: RopeTables, rows: int) -> RopeTables:
    """The tables of the first ``rows`` positions (the tables are (..., 1, N, head_dim))."""
    cos, sin = rope
    return cos[..., :rows, :], sin[..., :rows, :]


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    b, h, n, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)
    return out.transpose(1, 2).reshape(b, n, h * d)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection and optional RoPE."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: RopeTables | None, queries: int | None = None) -> Tensor:
        """All rows of ``x`` attend to all rows; with ``queries``, only the first ``queries``
        rows are computed (keys and values still come from every row)."""
        if queries is None:
            q, k, v = (_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        else:
            w_q, w_kv = self.qkv.weight.split([x.shape[-1], 2 * x.shape[-1]])
            b_q, b_kv = self.qkv.bias.split([x.shape[-1], 2 * x.shape[-1]])
            q = _heads(F.linear(x[:, :queries], w_q, b_q), self.num_heads)
            k, v = (_heads(t, self.num_heads) for t in F.linear(x, w_kv, b_kv).chunk(2, dim=-1))
        if rope is not None:
            q, k = apply_rope(q, first_rows(rope, q.shape[-2])), apply_rope(k, rope)
        return self.proj(_attend(q, k, v))


class CrossAttention(nn.Module):
    """Cross-attention (separate q, k, v projections) with optional RoPE on each side."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, y: Tensor, rope_x: RopeTables | None, rope_y: RopeTables | None
    ) -> Tensor:
        q = _heads(self.projq(x), self.num_heads)
        k = _heads(self.projk(y), self.num_heads)
        v = _heads(self.projv(y), self.num_heads)
        if rope_x is not None:
            q = apply_rope(q, rope_x)
        if rope_y is not None:
            k = apply_rope(k, rope_y)
        return self.proj(_attend(q, k, v))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block (CroCo ``Block``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, rope: RopeTables) -> Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention to the normalized other stream, MLP (DUSt3R's block)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=eps)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        rope_x: RopeTables | None = None,
        rope_y: RopeTables | None = None,
        queries: int | None = None,
    ) -> Tensor:
        """The block's output for every row of ``x``, or only for its first ``queries`` rows
        (the same values: every other row still serves as a key and value of the self-attention)."""
        rows = x if queries is None else x[:, :queries]
        out = rows + self.attn(self.norm1(x), rope_x, queries)
        if queries is not None and rope_x is not None:
            rope_x = first_rows(rope_x, queries)
        out = out + self.cross_attn(self.norm2(out), self.norm_y(y), rope_x, rope_y)
        return out + self.mlp(self.norm3(out))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; returns (B, h*w, dim) tokens and the grid (h, w)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(image)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), h, w
