"""The LLaVA-Video vision path: SigLIP tower -> mlp2x_gelu projector -> 2D pool -> newlines.

Per frame (so400m/14 at 384): 27x27 = 729 patch features of width 1152 from the tower's
26th layer (the last of 27 is dropped, output taken before ``post_layernorm``), projected
to the LLM width D, pooled with stride 2 (``bilinear`` -> 14x14, ``average`` -> 13x13),
then laid out row by row. The learned ``image_newline`` goes where LLaVA-NeXT's
``mm_newline_position`` says: ``grid`` after every row (LLaVA-Video: 14 x 15 = 210 tokens,
or 13 x 14 = 182), ``frame`` after every frame (197), ``one_token`` once after the whole
video (transformers' LlavaOnevision video layout: 196 per frame + 1), ``no_token`` never.

Tensor names: ``tower.*`` (transformers' ``SiglipVisionModel`` names, only the used
layers, no ``post_layernorm``, no head), ``projector.0.*``, ``projector.2.*``,
``image_newline``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from loc3r.models.config import Loc3rConfig
from loc3r.models.layout import (  # noqa: F401 - re-exported: the layout is part of the vision path
    POOL_MODES,
    layout_summary,
    newlines_per_frame,
    pooled_side,
    pooled_token_offsets,
    used_vision_layers,
    video_end_tokens,
    vision_tokens_per_frame,
)

def spatial_pool(features: Tensor, mode: str, stride: int) -> Tensor:
    """Pool ``(N, g*g, D)`` square-grid features to ``(N, h, w, D)`` as LLaVA's ``get_2dPool``."""
    n, tokens, dim = features.shape
    grid = math.isqrt(tokens)
    side = pooled_side(grid, mode, stride)
    x = features.view(n, grid, grid, dim).permute(0, 3, 1, 2)
    if mode == "bilinear":
        x = F.interpolate(x, size=(side, side), mode="bilinear")
    elif mode == "average":
        x = F.avg_pool2d(x, stride)
    else:
        x = F.max_pool2d(x, stride)
    return x.permute(0, 2, 3, 1)


def layout_tokens(pooled: Tensor, newline: Tensor, newline_position: str) -> Tensor:
    """``(N, h, w, D)`` -> one frame's tokens, row-major: ``(N, h*(w+1), D)`` with ``newline``
    after every row (``grid``), ``(N, h*w+1, D)`` after the frame (``frame``), else ``(N, h*w, D)``
    (``one_token`` puts its newline after the video: :meth:`VisionPath.video_end`)."""
    n, h, w, dim = pooled.shape
    newline = newline.to(pooled.dtype)
    if newline_position == "grid":
        pooled = torch.cat((pooled, newline.expand(n, h, 1, dim)), dim=2)
    tokens = pooled.reshape(n, -1, dim)
    if newline_position == "frame":
        tokens = torch.cat((tokens, newline.expand(n, 1, dim)), dim=1)
    return tokens


def siglip_config(config: Loc3rConfig) -> SiglipVisionConfig:
    """transformers' config of the SigLIP tower with only the used layers."""
    vision = config.vision
    return SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=used_vision_layers(vision, config.vision_select_layer),
        num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        layer_norm_eps=vision.layer_norm_eps,
        hidden_act=vision.hidden_act,
        vision_use_head=False,
    )


def build_tower(config: Loc3rConfig) -> SiglipVisionModel:
    """A SigLIP tower holding only the used layers and returning pre-``post_layernorm`` output."""
    tower = SiglipVisionModel(siglip_config(config))
    tower.post_layernorm = nn.Identity()
    return tower


class VisionPath(nn.Module):
    """SigLIP tower + mlp2x_gelu projector + spatial pooling + row newlines."""

    def __init__(self, config: Loc3rConfig) -> None:
        super().__init__()
        self.config = config
        width = config.llm.hidden_size
        self.tower = build_tower(config)
        self.projector = nn.Sequential(
            nn.Linear(config.vision.hidden_size, width), nn.GELU(), nn.Linear(width, width)
        )
        self.image_newline = nn.Parameter(torch.randn(width) / math.sqrt(width))

    @property
    def tokens_per_frame(self) -> int:
        """Vision tokens per frame after pooling and newlines."""
        return vision_tokens_per_frame(self.config)

    def features(self, pixel_values: Tensor) -> Tensor:
        """``(N, 3, S, S)`` -> projected patch features ``(N, grid*grid, D)``, before pooling."""
        return self.projector(self.tower(pixel_values=pixel_values).last_hidden_state)

    def pool(self, features: Tensor) -> Tensor:
        """``(N, grid*grid, D)`` -> ``(N, h, w, D)`` with the configured mode and stride."""
        return spatial_pool(features, self.config.spatial_pool_mode, self.config.spatial_pool_stride)

    def add_newlines(self, pooled: Tensor) -> Tensor:
        """``(N, h, w, D)`` -> ``(N, tokens_per_frame, D)`` per ``newline_position``."""
        return layout_tokens(pooled, self.image_newline, self.config.newline_position)

    def video_end(self) -> Tensor:
        """``(k, D)``: the tokens after the last frame block (the newline for ``one_token``)."""
        return self.image_newline.expand(video_end_tokens(self.config), -1)

    def encode(self, pixel_values: Tensor) -> Tensor:
        """``(N, 3, S, S)`` frames -> ``(N, tokens_per_frame, D)`` LLM input blocks."""
        return self.add_newlines(self.pool(self.features(pixel_values)))


_Rules = tuple[tuple[re.Pattern[str], str], ...]

_HF_ONEVISION_RULES: _Rules = (
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?"), "tower."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_1\."), "projector.0."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_2\."), "projector.2."),
    (re.compile(r"^(?:model\.)?image_newline$"), "image_newline"),
)
_LLAVA_NEXT_RULES: _Rules = (
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "tower."),
    (re.compile(r"^model\.mm_projector\."), "projector."),
    (re.compile(r"^model\.image_newline$"), "image_newline"),
)
_LAYER = re.compile(r"^tower\.encoder\.layers\.(\d+)\.")
_UNUSED_TOWER = re.compile(r"^tower\.(?:post_layernorm\.|head\.|embeddings\.position_ids$)")


def vision_state_dict_from_hf_llava_onevision(
    state_dict: dict[str, Tensor], keep_layers: int | None = None
) -> dict[str, Tensor]:
    """Our ``VisionPath`` tensors from a transformers llava-onevision state dict.

    Accepts the transformers 5 names (``model.vision_tower.*``,
    ``model.multi_modal_projector.linear_{1,2}.*``, ``model.image_newline``) and the older
    hub names (``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
    ``image_newline``). Language-model tensors, ``post_layernorm``, the pooling head and
    ``position_ids`` are left out, and so are encoder layers at index ``keep_layers`` or
    above when given (the -hf checkpoints already hold only the used 26 layers).
    """
    return _remap(state_dict, _HF_ONEVISION_RULES, keep_layers)


def vision_state_dict_from_llava_next(
    state_dict: dict[str, Tensor], keep_layers: int | None = None
) -> dict[str, Tensor]:
    """Our ``VisionPath`` tensors from a LLaVA-NeXT (LLaVA-Video) checkpoint's state dict.

    Names there: ``model.vision_tower.vision_tower.vision_model.*`` (SigLIP),
    ``model.mm_projector.{0,2}.*``, ``model.image_newline``; the rest is the Qwen2 LLM.
    Filtering as in :func:`vision_state_dict_from_hf_llava_onevision`; pass
    ``keep_layers`` (see :func:`used_vision_layers`) in case the full tower was saved.
    """
    return _remap(state_dict, _LLAVA_NEXT_RULES, keep_layers)


def _remap(state_dict: dict[str, Tensor], rules: _Rules, keep_layers: int | None) -> dict[str, Tensor]:
    """Rename the vision tensors by ``rules``; drop the rest, unused tower parts and extra layers."""
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        name = _rename(key, rules)
        if name is None or _UNUSED_TOWER.match(name):
            continue
        layer = _LAYER.match(name)
        if keep_layers is not None and layer and int(layer.group(1)) >= keep_layers:
            continue
        out[name] = tensor
    return out


def _rename(key: str, rules: _Rules) -> str | None:
    """The ``VisionPath`` name of one checkpoint tensor, or None if it is not ours."""
    for pattern, prefix in rules:
        match = pattern.match(key)
        if match:
            return prefix + key[match.end():]
    return None
