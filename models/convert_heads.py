"""Loc3R head weights for a converted bundle: read from a file, or random (untrained).

Expected tensors (an optional ``heads.`` prefix is accepted), with C the 3D encoder's
camera token width (``camera_dim``: CUT3R's ``dec_embed_dim`` 768, VGGT-1B's 2048), D the
LLM width (3584), H the heads' hidden width and B the orientation bins (36):

==================  ==========  ==================  ==========
``f_cam.0.weight``  (D, C)      ``f_cam.2.weight``  (D, D)
``f_pos.0.weight``  (H, D)      ``f_pos.2.weight``  (3, H)
``f_ori.0.weight``  (H, D)      ``f_ori.2.weight``  (B, H)
``f_bev.0.weight``  (H, D)      ``f_bev.2.weight``  (2, H)
==================  ==========  ==================  ==========

and a ``.bias`` of each layer's output width. H and B are read from the file.
The file is safetensors, or a PyTorch ``.pth``/``.pt`` holding the state dict (bare or
under ``"model"``/``"state_dict"``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from loc3r.errors import ModelError
from loc3r.models.config import HeadsConfig, Loc3rConfig
from loc3r.models.convert_stream import load_tensor_pickle
from loc3r.models.heads import Loc3rHeads

HEAD_MODULES = ("f_cam", "f_pos", "f_ori", "f_bev")
_FIX = "pass a Loc3R heads file with f_cam.*, f_pos.*, f_ori.*, f_bev.* tensors"


def load_heads_file(path: Path) -> dict[str, Tensor]:
    """The head tensors of ``path``, named ``f_*.{0,2}.{weight,bias}``."""
    if not path.is_file():
        raise ModelError(f"heads file {path} does not exist", _FIX)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path} is not a readable heads file ({type(exc).__name__})", _FIX) from None
    else:
        state = load_tensor_pickle(path, "heads file", _FIX)
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors", _FIX)
    tensors = {str(k).removeprefix("heads."): v for k, v in state.items()}
    ours = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in HEAD_MODULES}
    if not ours:
        raise ModelError(f"{path} holds no f_cam/f_pos/f_ori/f_bev tensors", _FIX)
    return ours


def heads_config(tensors: dict[str, Tensor]) -> HeadsConfig:
    """Hidden width and orientation bins from the tensor shapes."""
    for name in ("f_pos.0.weight", "f_ori.2.weight"):
        if name not in tensors:
            raise ModelError(f"heads file lacks {name}", _FIX)
    return HeadsConfig(hidden_size=tensors["f_pos.0.weight"].shape[0], ori_bins=tensors["f_ori.2.weight"].shape[0])


def random_heads(config: Loc3rConfig, camera_dim: int, seed: int = 0) -> dict[str, Tensor]:
    """Freshly initialised heads (PyTorch's default init from ``seed``), without touching
    the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dict(Loc3rHeads(config, camera_dim).state_dict())
