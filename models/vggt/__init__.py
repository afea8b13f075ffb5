"""VGGT camera-token encoder: our PyTorch re-implementation of the aggregator's camera path.

Names load on first use, so that ``loc3r.models.vggt.config`` (read by runtimes that never
run PyTorch) does not import torch.
"""

from loc3r.lazy import lazy_exports

_WHERE = {
    "load_vggt": "checkpoint",
    "save_official_checkpoint": "checkpoint",
    "VggtConfig": "config",
    "VggtCameraEncoder": "encoder",
    "random_state_dict": "random_weights",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
