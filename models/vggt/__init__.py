"""VGGT camera-token encoder: our PyTorch re-implementation of the aggregator's camera path."""

from loc3r.models.vggt.checkpoint import load_vggt, save_official_checkpoint
from loc3r.models.vggt.config import VggtConfig
from loc3r.models.vggt.encoder import VggtCameraEncoder
from loc3r.models.vggt.random_weights import random_state_dict

__all__ = ["VggtCameraEncoder", "VggtConfig", "load_vggt", "random_state_dict", "save_official_checkpoint"]
