"""Read (and, for tests, write) VGGT checkpoints in the published layout, without the reference code.

facebook/VGGT-1B ships ``model.pt`` (``torch.save`` of the ``VGGT`` state dict) and
``model.safetensors`` (the same tensors) beside a ``config.json``. The camera path needs
the ``aggregator.*`` tensors only; the camera, depth, point and track heads and the DINOv2
``mask_token`` are skipped. Sizes come from tensor shapes: the width from
``camera_token``, the aggregator's heads from its per-head q/k LayerNorm, the training
size from the position embedding, the DINOv2 heads from its 64-wide head convention.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from loc3r.errors import ModelError
from loc3r.models.vggt.config import VggtConfig
from loc3r.models.vggt.encoder import VggtCameraEncoder

log = logging.getLogger(__name__)

PREFIX = "aggregator."
CHECKPOINT_FILES = ("model.safetensors", "model.pt")
_FIX = "pass VGGT's model.pt or model.safetensors (facebook/VGGT-1B), or the folder holding it"


def checkpoint_file(path: Path) -> Path:
    """``path`` itself, or the published weight file inside a folder."""
    if path.is_dir():
        for name in CHECKPOINT_FILES:
            if (path / name).is_file():
                return path / name
        raise ModelError(f"{path} holds neither {' nor '.join(CHECKPOINT_FILES)}", _FIX)
    if not path.is_file():
        raise ModelError(f"VGGT checkpoint {path} does not exist", _FIX)
    return path


def read_aggregator(path: Path) -> dict[str, Tensor]:
    """The ``aggregator.*`` tensors of a safetensors or PyTorch file, prefix removed."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                return {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)}
        with path.open("rb") as stream:
            zipped = stream.read(4) == b"PK\x03\x04"
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError:
        problem = "holds Python objects besides tensors" if zipped else "is not a readable checkpoint"
        raise ModelError(f"{path} {problem}, so it is not a VGGT checkpoint", _FIX) from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable checkpoint ({type(exc).__name__})", f"download it again or {_FIX}") from None
    if isinstance(state, dict):
        state = state.get("model", state)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path} holds no state dict of tensors", _FIX)
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}


def _count(sd: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def infer_config(sd: dict[str, Tensor]) -> VggtConfig:
    """Sizes from tensor shapes (see the module docstring)."""
    dim = sd["camera_token"].shape[-1]
    patch = sd["patch_embed.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["patch_embed.pos_embed"].shape[1] - 1)
    if "frame_blocks.0.attn.q_norm.weight" not in sd:
        raise ModelError("the VGGT aggregator has no q/k normalisation; only VGGT-1B's design is supported", _FIX)
    return VggtConfig(
        embed_dim=dim,
        depth=_count(sd, "frame_blocks"),
        num_heads=dim // sd["frame_blocks.0.attn.q_norm.weight"].shape[0],
        patch_embed_depth=_count(sd, "patch_embed.blocks"),
        mlp_ratio=sd["frame_blocks.0.mlp.fc1.weight"].shape[0] / dim,
        num_register_tokens=sd["register_token"].shape[2],
        patch_size=patch,
        img_size=grid * patch,
    )


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")


def load_vggt(path: str | Path) -> VggtCameraEncoder:
    """A published VGGT checkpoint (file or folder) -> camera encoder in eval mode."""
    path = checkpoint_file(Path(path))
    sd = read_aggregator(path)
    if "camera_token" not in sd or "register_token" not in sd:
        raise ModelError(f"{path} is not a VGGT checkpoint (no aggregator camera/register tokens)", _FIX)
    try:
        config = infer_config(sd)
    except KeyError as exc:
        raise ModelError(f"{path} lacks VGGT tensor {PREFIX}{exc.args[0]}", _FIX) from None
    with torch.device("meta"):
        model = VggtCameraEncoder(config)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(sd))
    bad_shape = sorted(k for k in set(wanted) & set(sd) if sd[k].shape != wanted[k].shape)
    if missing or bad_shape:
        problems = [f"{kind} {_names(keys)}" for kind, keys in (("missing", missing), ("mis-shaped", bad_shape)) if keys]
        raise ModelError(f"{path} does not fit the VGGT camera encoder: {'; '.join(problems)}", _FIX)
    model.load_state_dict({k: sd[k].float() for k in wanted}, strict=True, assign=True)
    model.skipped_keys = tuple(sorted(set(sd) - set(wanted)))
    log.info("loaded VGGT %s (aggregator only); skipped %d unneeded aggregator keys", path, len(model.skipped_keys))
    return model.eval()


def save_official_checkpoint(state_dict: dict[str, Tensor], path: str | Path) -> None:
    """Write aggregator weights as VGGT's published file (``.safetensors``, else ``torch.save``).

    Adds tensors the camera path does not read (the DINOv2 ``mask_token`` and one tensor of
    each head) so that loaders exercise their skip path.
    """
    dim = state_dict["camera_token"].shape[-1]
    tensors = {PREFIX + k: v.contiguous() for k, v in state_dict.items()}
    tensors[PREFIX + "patch_embed.mask_token"] = torch.zeros(1, dim)
    for head in ("camera_head.token_norm.weight", "depth_head.norm.weight", "point_head.norm.weight", "track_head.feature_extractor.norm.weight"):
        tensors[head] = torch.ones(2 * dim)
    if str(path).endswith(".safetensors"):
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
