"""CUT3R camera-token encoder: our PyTorch re-implementation of the reference's camera path."""

from loc3r.models.cut3r.checkpoint import load_cut3r, official_model_line, save_official_checkpoint
from loc3r.models.cut3r.config import Cut3rConfig
from loc3r.models.cut3r.encoder import Cut3rCameraEncoder
from loc3r.models.cut3r.random_weights import random_state_dict
from loc3r.models.cut3r.state import Cut3rState

__all__ = [
    "Cut3rCameraEncoder",
    "Cut3rConfig",
    "Cut3rState",
    "load_cut3r",
    "official_model_line",
    "random_state_dict",
    "save_official_checkpoint",
]
