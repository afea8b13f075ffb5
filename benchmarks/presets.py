"""Benchmark models: ``tiny`` (the built-in test model) and ``small``, a random model with the
real architecture's token geometry at widths and depths that run 32 frames in minutes on
two CPU cores.

``small`` keeps every size that sets a sequence length: SigLIP 384/14 (27x27 patches ->
14x14 bilinear pooling + row newlines = 210 tokens per frame), 32 frames, CUT3R at 512
long side (32x24 = 768 patches at 512x384) with the real 768 state tokens and 256
pose-memory slots, 36 orientation bins. Only widths and depths are scaled down (see
:func:`small_config`). Its weights are random (seed 0): timings only, never answers.
``small-vggt`` is ``small`` with VGGT as its 3D encoder, scaled the same way (see
:func:`small_vggt`).
"""

from __future__ import annotations

from pathlib import Path

from loc3r.models.config import HeadsConfig, LLMConfig, Loc3rConfig, VisionConfig
from loc3r.models.cut3r import Cut3rConfig
from loc3r.models.encoder3d import with_vggt
from loc3r.models.tiny import build_random_bundle, loc3r_home, resolve_model
from loc3r.models.vggt import VggtConfig

SMALL_NAME = "small"
SMALL_VGGT_NAME = "small-vggt"
SMALL_VERSION = 1
SMALL_SEED = 0
PRESETS = ("tiny", SMALL_NAME)  # what loc3r-bench exports on the fly (its baseline models CUT3R)


def small_cut3r() -> Cut3rConfig:
    """CUT3R with the real state (768 tokens) and memory (256 slots), narrow and shallow."""
    return Cut3rConfig(
        enc_embed_dim=256,
        enc_depth=4,
        enc_num_heads=4,
        dec_embed_dim=256,
        dec_depth=3,
        dec_num_heads=4,
        state_size=768,
        state_dec_num_heads=4,
        local_mem_size=256,
        img_size=(512, 512),
        head_type="dpt",
    )


def small_vggt() -> VggtConfig:
    """VGGT at the real geometry (518 training size, 14-pixel patches, 4 registers) and
    ``small_cut3r``'s scaling: width 256 (4 heads), depths 24 -> 4."""
    return VggtConfig(embed_dim=256, depth=4, num_heads=4, patch_embed_depth=4)


def small_config(vocab_size: int) -> Loc3rConfig:
    """Real token geometry (210 vision tokens per frame, 32 frames), scaled widths/depths."""
    return Loc3rConfig(
        model_id=f"loc3r-small-random-v{SMALL_VERSION}",
        vision=VisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3),
        llm=LLMConfig(
            vocab_size=vocab_size,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16384,
        ),
        cut3r=small_cut3r().to_dict(),
        heads=HeadsConfig(hidden_size=256, ori_bins=36),
        num_frames=32,
        cut3r_long_side=512,
        localization="untrained",
        random_weights=True,
    )


def small_vggt_config(vocab_size: int) -> Loc3rConfig:
    """``small`` with ``small_vggt`` as the 3D encoder."""
    return with_vggt(small_config(vocab_size), small_vggt(), f"loc3r-small-vggt-random-v{SMALL_VERSION}")


SMALL_MODELS = {SMALL_NAME: small_config, SMALL_VGGT_NAME: small_vggt_config}


def build_small_bundle(out_dir: str | Path, seed: int = SMALL_SEED, name: str = SMALL_NAME) -> Path:
    """The small preset ``name``'s bundle at ``out_dir`` (tiny tokenizer, weights from ``seed``)."""
    return build_random_bundle(out_dir, SMALL_MODELS[name], seed)


def ensure_small_bundle(name: str = SMALL_NAME) -> Path:
    """``loc3r_home()/models/<name>-v1``, built the first time it is asked for."""
    path = loc3r_home() / "models" / f"{name}-v{SMALL_VERSION}"
    if not (path / "config.json").is_file():
        build_small_bundle(path, name=name)
    return path


def resolve_bench_model(name_or_dir: str | Path) -> Path:
    """``small`` / ``small-vggt`` -> its bundle (built on first use); ``tiny`` or a folder as ``resolve_model``."""
    if str(name_or_dir) in SMALL_MODELS:
        return ensure_small_bundle(str(name_or_dir))
    return resolve_model(name_or_dir)
