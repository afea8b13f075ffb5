"""VGGT camera-token encoder: our PyTorch re-implementation of the aggregator's camera path."""

from loc3r.models.vggt.config import VggtConfig
from loc3r.models.vggt.encoder import VggtCameraEncoder

__all__ = ["VggtCameraEncoder", "VggtConfig"]
