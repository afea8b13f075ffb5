"""The 3D encoders a bundle can hold (``config.encoder_3d``), each giving one camera token per frame.

- ``cut3r``: recurrent, streams: ``step(image, state)`` per frame as it arrives.
- ``vggt``: attends over the whole clip: ``encode(frames)`` once the clip is complete.

Both provide ``encode(frames)`` and ``camera_dim`` (``f_cam``'s input width); ``streaming``
says whether ``step`` exists.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from loc3r.models.config import Loc3rConfig
from loc3r.models.cut3r.config import Cut3rConfig
from loc3r.models.vggt.config import VggtConfig

if TYPE_CHECKING:  # the PyTorch modules load only where a model is built
    from loc3r.models.cut3r.encoder import Cut3rCameraEncoder
    from loc3r.models.vggt.encoder import VggtCameraEncoder

    CameraEncoder = Cut3rCameraEncoder | VggtCameraEncoder


def encoder_config(config: Loc3rConfig) -> Cut3rConfig | VggtConfig:
    """The sizes of the bundle's 3D encoder, from its section (``cut3r`` or ``vggt``)."""
    if config.encoder_3d == "vggt":
        return VggtConfig.from_dict(config.vggt)
    return Cut3rConfig.from_dict(config.cut3r)


def build_camera_encoder(config: Loc3rConfig) -> CameraEncoder:
    """An uninitialised camera encoder of the bundle's kind and sizes."""
    from loc3r.models.cut3r.encoder import Cut3rCameraEncoder
    from loc3r.models.vggt.encoder import VggtCameraEncoder

    sizes = encoder_config(config)
    return VggtCameraEncoder(sizes) if isinstance(sizes, VggtConfig) else Cut3rCameraEncoder(sizes)


def with_vggt(config: Loc3rConfig, vggt: VggtConfig, model_id: str) -> Loc3rConfig:
    """``config`` with ``vggt`` as its 3D encoder instead (random-weight presets)."""
    return dataclasses.replace(config, model_id=model_id, encoder_3d="vggt", cut3r={}, vggt=vggt.to_dict())
