"""VGGT camera-token encoder: our PyTorch re-implementation of the aggregator's camera path.

Names load on first use, so that ``loc3r.models.vggt.config`` (read by runtimes that never
run PyTorch) does not import torch.
"""

import importlib
from typing import Any

_WHERE = {
    "load_vggt": "checkpoint",
    "save_official_checkpoint": "checkpoint",
    "VggtConfig": "config",
    "VggtCameraEncoder": "encoder",
    "random_state_dict": "random_weights",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
