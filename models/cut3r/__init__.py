"""CUT3R camera-token encoder: our PyTorch re-implementation of the reference's camera path.

Names load on first use, so that ``loc3r.models.cut3r.config`` (read by runtimes that never
run PyTorch) does not import torch.
"""

import importlib
from typing import Any

_WHERE = {
    "load_cut3r": "checkpoint",
    "official_model_line": "checkpoint",
    "save_official_checkpoint": "checkpoint",
    "Cut3rConfig": "config",
    "Cut3rCameraEncoder": "encoder",
    "random_state_dict": "random_weights",
    "Cut3rState": "state",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
