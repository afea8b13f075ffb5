"""The video's token layout in the LLM sequence: counts and offsets from the config alone.

Kept free of torch so that the exported-graph runtimes (ONNX Runtime, TensorRT) can lay out
prompts without loading the PyTorch model code (``loc3r.models.vision`` re-exports these).
"""

from __future__ import annotations

import math

from loc3r.errors import ModelError
from loc3r.models.config import Loc3rConfig, VisionConfig

POOL_MODES = ("bilinear", "average", "max")


def used_vision_layers(vision: VisionConfig, select_layer: int) -> int:
    """How many tower layers feed the projector.

    ``select_layer`` indexes the full tower's ``hidden_states`` (0 = embeddings, i = output
    of layer i), as LLaVA's ``mm_vision_select_layer`` does: -2 on 27 layers -> 26 layers.
    Keeping exactly these layers and reading the encoder output (before ``post_layernorm``)
    gives the same features as LLaVA-NeXT (``del layers[-1:]``, ``hidden_states[-1]``) and
    as transformers' llava-onevision (26-layer tower, ``vision_feature_layer=-1``).
    """
    total = vision.num_hidden_layers
    used = total + 1 + select_layer if select_layer < 0 else select_layer
    if not 1 <= used <= total:
        raise ModelError(
            f"config.json: vision_select_layer {select_layer} does not select a layer "
            f"of a {total}-layer tower",
            "use -2 (LLaVA-Video) or an index between 1 and num_hidden_layers",
        )
    return used


def pooled_side(grid: int, mode: str, stride: int) -> int:
    """Pooled rows (= columns) of a ``grid`` x ``grid`` map: ceil for bilinear, floor else."""
    if mode not in POOL_MODES:
        raise ModelError(f"spatial pool mode {mode!r} is not supported", f"use one of {POOL_MODES}")
    return math.ceil(grid / stride) if mode == "bilinear" else grid // stride


def vision_tokens_per_frame(config: Loc3rConfig) -> int:
    """Vision tokens one frame contributes to the LLM sequence (210 for LLaVA-Video-7B)."""
    side = pooled_side(config.vision.grid, config.spatial_pool_mode, config.spatial_pool_stride)
    return len(pooled_token_offsets(side, config.newline_position)) + newlines_per_frame(side, config.newline_position)


def newlines_per_frame(side: int, newline_position: str) -> int:
    return {"grid": side, "frame": 1}.get(newline_position, 0)


def video_end_tokens(config: Loc3rConfig) -> int:
    """Tokens after the last frame block (``one_token``: the video's single newline)."""
    return int(config.newline_position == "one_token")


def layout_summary(config: Loc3rConfig) -> str:
    """One line naming the video layout and its token counts, e.g. for ``loc3r-convert``."""
    end = video_end_tokens(config)
    return (f"video layout {config.video_layout}: {config.spatial_pool_mode} pooling, stride {config.spatial_pool_stride}, "
            f"newlines {config.newline_position}: {vision_tokens_per_frame(config)} vision tokens per frame"
            + (f" + {end} after the video" if end else ""))


def pooled_token_offsets(side: int, newline_position: str) -> list[int]:
    """Where, in one frame's vision tokens, each pooled token sits (row-major; newlines skipped)."""
    per_row = side + int(newline_position == "grid")
    return [row * per_row + col for row in range(side) for col in range(side)]
