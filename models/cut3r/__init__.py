"""CUT3R camera-token encoder: our PyTorch re-implementation of the reference's camera path.

Names load on first use, so that ``loc3r.models.cut3r.config`` (read by runtimes that never
run PyTorch) does not import torch.
"""

from loc3r.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _WHERE)
