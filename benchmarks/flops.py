"""FLOP and parameter counts of Loc3R's blocks and stages, at any size.

Conventions: a multiply-add is 2 FLOPs; only matrix products are counted (linear layers and
the two attention products QK^T and PV). Norms, softmax, activations, RoPE and biases are
left out: together well under 1% of every stage here. Parameter counts likewise skip biases
and norm weights. Attention FLOPs do not depend on the head count (heads x head_dim = width).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loc3r.models.config import LLMConfig, VisionConfig
from loc3r.models.cut3r.config import Cut3rConfig
from loc3r.models.vggt.config import VggtConfig


@dataclass(frozen=True)
class Work:
    """What a stage computes: FLOPs and the parameters it reads."""

    flops: float
    params: float

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.params + other.params)

    def __mul__(self, k: float) -> Work:
        return Work(self.flops * k, self.params * k)


@dataclass(frozen=True)
class Cut3rSizes:
    """CUT3R's camera path at one input size; the heads' share of a full frame's FLOPs."""

    config: Cut3rConfig = field(default_factory=Cut3rConfig.real_512_dpt)
    height: int = 384
    width: int = 512
    head_flop_share: float = 0.37  # DPT + pose heads at 512x384 (design note)

    @property
    def patches(self) -> int:
        p = self.config.patch_size
        return (self.height // p) * (self.width // p)


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    """``tokens`` rows through a ``d_in -> d_out`` linear layer."""
    return 2.0 * tokens * d_in * d_out


def attention_flops(n_q: int, n_k: int, width: int) -> float:
    """QK^T plus PV for ``n_q`` queries over ``n_k`` keys (no mask)."""
    return 4.0 * n_q * n_k * width


def causal_attention_flops(n_new: int, n_past: int, width: int) -> float:
    """QK^T plus PV for ``n_new`` causal queries after ``n_past`` cached positions."""
    keys = n_new * n_past + n_new * (n_new + 1) / 2  # query i sees n_past + i + 1 keys
    return 4.0 * keys * width


def vit_block(tokens: int, width: int, mlp: int) -> Work:
    """Pre-norm ViT block: self-attention (QKV, output projection) and a 2-layer MLP."""
    flops = (
        linear_flops(tokens, width, 3 * width)
        + attention_flops(tokens, tokens, width)
        + linear_flops(tokens, width, width)
        + 2 * linear_flops(tokens, width, mlp)
    )
    return Work(flops, 4 * width * width + 2 * width * mlp)


def cross_block(n_x: int, n_y: int, width: int, mlp: int) -> Work:
    """CUT3R / dust3r decoder block on ``n_x`` tokens attending to ``n_y`` other tokens."""
    self_attn = linear_flops(n_x, width, 3 * width) + attention_flops(n_x, n_x, width)
    self_attn += linear_flops(n_x, width, width)
    cross_attn = linear_flops(n_x, width, width) + linear_flops(n_y, width, 2 * width)
    cross_attn += attention_flops(n_x, n_y, width) + linear_flops(n_x, width, width)
    ffn = 2 * linear_flops(n_x, width, mlp)
    return Work(self_attn + cross_attn + ffn, 8 * width * width + 2 * width * mlp)


def qwen2_layer(cfg: LLMConfig, n_new: int, n_past: int = 0) -> Work:
    """One Qwen2 decoder layer (GQA attention, SwiGLU MLP) on ``n_new`` tokens."""
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    q_width = cfg.num_attention_heads * cfg.head_dim
    proj = linear_flops(n_new, d, q_width) + 2 * linear_flops(n_new, d, kv) + linear_flops(n_new, q_width, d)
    attn = causal_attention_flops(n_new, n_past, q_width)
    mlp = 3 * linear_flops(n_new, d, cfg.intermediate_size)
    params = 2 * d * q_width + 2 * d * kv + 3 * d * cfg.intermediate_size
    return Work(proj + attn + mlp, params)


def cut3r_frame(sizes: Cut3rSizes, with_heads: bool = False) -> Work:
    """One CUT3R step: encoder, two-stream decoder, pose memory (+ heads if asked).

    The image stream carries the patches plus the pose token, the state stream the state
    tokens; each cross-attends to the other. The pose memory is read (one query over its
    slots; frame 0 uses the pose token instead, counted anyway) and written (the slots attend
    to the new pair). The heads are not modelled layer by layer: their FLOPs are
    ``head_flop_share`` of the full frame, so full = body / (1 - share); their parameters are
    not counted (they are not run for camera tokens). ``params`` includes the state
    initialisation (register tokens, ``decoder_embed_state``), run once per video.
    """
    c, n = sizes.config, sizes.patches
    enc, dec, mem = c.enc_embed_dim, c.dec_embed_dim, c.mem_dim
    patch_dim = 3 * c.patch_size**2
    body = Work(linear_flops(n, patch_dim, enc), patch_dim * enc)
    body += vit_block(n, enc, int(enc * c.mlp_ratio)) * c.enc_depth
    body += Work(linear_flops(n, enc, dec), enc * dec)  # decoder_embed
    body += cross_block(n + 1, c.state_size, dec, int(dec * c.mlp_ratio)) * c.dec_depth
    body += cross_block(c.state_size, n + 1, dec, int(dec * c.mlp_ratio)) * c.dec_depth
    body += Work(2 * linear_flops(1, enc, dec), enc * dec + c.local_mem_size * mem)  # proj_q, slots
    body += cross_block(1, c.local_mem_size, mem, int(mem * c.mlp_ratio)) * c.mem_depth  # read
    body += cross_block(c.local_mem_size, 1, mem, int(mem * c.mlp_ratio)) * c.mem_depth  # write
    body += Work(0.0, c.state_size * enc + enc * dec)  # register tokens, decoder_embed_state
    if with_heads:
        return Work(body.flops / (1.0 - sizes.head_flop_share), body.params)
    return body


def vggt_clip(config: VggtConfig, frames: int, height: int, width: int) -> Work:
    """VGGT's aggregator over one clip of ``frames`` (camera-token path: no heads).

    Per frame, the DINOv2 patch embedding (class + register + patch tokens) and the frame
    blocks see the frame's own tokens; the global blocks see every token of the clip, so
    their attention grows with the square of the frame count. ``params`` counts the weights
    once (the clip is one batch).
    """
    c, p = config, config.patch_size
    patches = (height // p) * (width // p)
    per_frame = patches + 1 + c.num_register_tokens  # (class or camera) + registers + patches
    mlp = int(c.embed_dim * c.mlp_ratio)
    patch_dim = 3 * p * p
    work = Work(linear_flops(patches, patch_dim, c.embed_dim) * frames, patch_dim * c.embed_dim)
    work += Work(vit_block(per_frame, c.embed_dim, mlp).flops * frames, vit_block(1, c.embed_dim, mlp).params) * (
        c.patch_embed_depth + c.depth
    )
    return work + vit_block(per_frame * frames, c.embed_dim, mlp) * c.depth


def vggt_global_attention_flops(config: VggtConfig, frames: int, height: int, width: int) -> float:
    """The part of ``vggt_clip`` spent in the global blocks' QK^T and PV (quadratic in frames)."""
    tokens = ((height // config.patch_size) * (width // config.patch_size) + 1 + config.num_register_tokens) * frames
    return attention_flops(tokens, tokens, config.embed_dim) * config.depth


def siglip_frame(cfg: VisionConfig, layers_used: int) -> Work:
    """SigLIP on one frame: patch embedding and ``layers_used`` encoder layers."""
    tokens, patch_dim = cfg.grid**2, 3 * cfg.patch_size**2
    work = Work(linear_flops(tokens, patch_dim, cfg.hidden_size), patch_dim * cfg.hidden_size)
    return work + vit_block(tokens, cfg.hidden_size, cfg.intermediate_size) * layers_used


def projector_frame(vision: VisionConfig, llm: LLMConfig) -> Work:
    """``mlp2x_gelu`` projector on every SigLIP token (pooling runs after it, negligible)."""
    tokens, d_v, d = vision.grid**2, vision.hidden_size, llm.hidden_size
    return Work(linear_flops(tokens, d_v, d) + linear_flops(tokens, d, d), d_v * d + d * d)


def llm_forward(cfg: LLMConfig, n_new: int, n_past: int = 0) -> Work:
    """All decoder layers on ``n_new`` tokens plus ``lm_head`` on the last one.

    ``params`` covers the layers only; ``lm_head`` and the embedding are sized by
    :func:`vocab_params` because they are often stored at another precision.
    """
    layers = qwen2_layer(cfg, n_new, n_past) * cfg.num_hidden_layers
    return Work(layers.flops + linear_flops(1, cfg.hidden_size, cfg.vocab_size), layers.params)


def vocab_params(cfg: LLMConfig) -> float:
    """Parameters of ``lm_head`` (one table; the embedding is another unless tied)."""
    return float(cfg.vocab_size * cfg.hidden_size)


def kv_bytes_per_token(cfg: LLMConfig, bytes_per_value: float = 2.0) -> float:
    """KV-cache bytes one position occupies over all layers."""
    return 2.0 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * bytes_per_value


def bits_per_weight(fmt: str, block_size: int | None = None, scale_bits: int = 16) -> float:
    """Storage bits per weight: 16/32 for floats, 4/8 plus one ``scale_bits`` scale per block.

    Symmetric quantization (no zero point): int4 block 32 = 4.5, block 128 = 4.125.
    """
    base = {"fp32": 32.0, "fp16": 16.0, "int8": 8.0, "int4": 4.0}[fmt]
    if fmt in ("int4", "int8"):
        if not block_size:
            raise ValueError(f"{fmt} needs a block size")
        return base + scale_bits / block_size
    return base


def loc3r_heads_params(llm: LLMConfig, head_hidden: int, ori_bins: int, camera_dim: int) -> float:
    """Parameters of ``f_cam`` (camera -> width -> width) and ``f_pos``/``f_ori``/``f_bev``."""
    d = llm.hidden_size
    f_cam = camera_dim * d + d * d
    readouts = 3 * d * head_hidden + head_hidden * (3 + ori_bins + 2)
    return float(f_cam + readouts)
