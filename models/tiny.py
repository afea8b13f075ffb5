"""The built-in tiny model: random weights, real token geometry, built on first use.

It has the real layout (SigLIP 384/14 -> 27x27 patches -> 14x14 pooled + newlines, the
CUT3R recurrence with a state and a memory, 36 orientation bins) at toy widths, so the
whole runtime can be exercised on a CPU in seconds. Its answers are meaningless: the
weights are random, and everything that shows its output says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from loc3r.models.config import HeadsConfig, LLMConfig, Loc3rConfig, VisionConfig
from loc3r.models.cut3r.config import Cut3rConfig
from loc3r.models.encoder3d import with_vggt
from loc3r.models.tokenizer import train_tiny_tokenizer
from loc3r.models.vggt.config import VggtConfig

TINY_NAME = "tiny"
TINY_VGGT_NAME = "tiny-vggt"
TINY_VERSION = 1
TINY_SEED = 0


def loc3r_home() -> Path:
    """Where built-in bundles and caches live (``$LOC3R_HOME``, else ``~/.cache/loc3r``)."""
    return Path(os.environ.get("LOC3R_HOME") or Path.home() / ".cache" / "loc3r")


def tiny_config(vocab_size: int) -> Loc3rConfig:
    """Toy widths, real geometry."""
    return Loc3rConfig(
        model_id=f"loc3r-tiny-random-v{TINY_VERSION}",
        vision=VisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2
        ),
        llm=LLMConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16384,
        ),
        cut3r=Cut3rConfig.tiny().to_dict(),
        heads=HeadsConfig(hidden_size=32),
        localization="untrained",
        random_weights=True,
    )


def tiny_vggt_config(vocab_size: int) -> Loc3rConfig:
    """The tiny model with a tiny VGGT (whole-clip attention) as its 3D encoder."""
    return with_vggt(tiny_config(vocab_size), VggtConfig.tiny(), f"loc3r-tiny-vggt-random-v{TINY_VERSION}")


BUILTIN = {TINY_NAME: tiny_config, TINY_VGGT_NAME: tiny_vggt_config}


def build_random_bundle(out_dir: str | Path, make_config: Callable[[int], Loc3rConfig], seed: int) -> Path:
    """Train the tiny tokenizer, initialise ``make_config(vocab)`` from ``seed``, save the bundle."""
    import torch

    from loc3r.models.loc3r_model import Loc3rModel
    from loc3r.models.weights import save_bundle

    corpus = resources.files("loc3r").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    tokenizer = train_tiny_tokenizer(corpus.splitlines())
    torch.manual_seed(seed)
    model = Loc3rModel(make_config(tokenizer.vocab_size))
    return save_bundle(model, tokenizer, out_dir)


def build_tiny_bundle(out_dir: str | Path, seed: int = TINY_SEED, name: str = TINY_NAME) -> Path:
    """The built-in model ``name``'s bundle at ``out_dir``."""
    return build_random_bundle(out_dir, BUILTIN[name], seed)


def ensure_tiny_bundle(name: str = TINY_NAME) -> Path:
    """The built-in bundle's folder, built the first time it is asked for."""
    path = loc3r_home() / "models" / f"{name}-v{TINY_VERSION}"
    if not (path / "config.json").is_file():
        build_tiny_bundle(path, name=name)
    return path


def resolve_model(name_or_dir: str | Path) -> Path:
    """``tiny`` / ``tiny-vggt`` -> the built-in bundle; anything else is a bundle folder."""
    if str(name_or_dir) in BUILTIN:
        return ensure_tiny_bundle(str(name_or_dir))
    return Path(name_or_dir)
