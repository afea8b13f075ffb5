"""Frame preprocessing for the image encoders: CUT3R or VGGT (camera tokens) and SigLIP (vision tokens).

``cut3r_input`` reproduces CUT3R's ``load_images`` (src/dust3r/utils/image.py) on decoded
RGB frames; ``vggt_input`` VGGT's ``load_and_preprocess_images`` (crop mode,
vggt/utils/load_fn.py); ``camera_input`` picks the bundle's; ``siglip_input`` computes what transformers' PIL SigLIP
processor configured as LLaVA-Video's ``SigLipImageProcessor`` gives (squash to size x size, bicubic, mean = std
= 0.5), bit for bit (tests/test_preprocess.py).
The ``*_pixels`` functions return numpy arrays (what the runtime feeds every backend, so the exported paths
never load torch); the ``*_input`` ones the same values as torch tensors.
Given RGB arrays, all three resize with PIL as the references do; given decoded ``Frame``s,
the resize happens in the decoder's colour conversion (swscale, same filters), within a
measured bound of the PIL route (``loc3r.runtime.frame``).
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from loc3r.errors import InputError
from loc3r.models.config import Loc3rConfig
from loc3r.models.encoder3d import encoder_config
from loc3r.models.vggt.config import VggtConfig
from loc3r.runtime.frame import Frame

if TYPE_CHECKING:
    import torch

__all__ = [
    "camera_input", "camera_pixels", "cut3r_crop_box", "cut3r_input", "cut3r_pixels", "siglip_input", "siglip_pixels",
    "vggt_input", "vggt_pixels",
]  # fmt: skip


def camera_pixels(image: np.ndarray | Frame, config: Loc3rConfig) -> np.ndarray:
    """The bundle's 3D-encoder input for one RGB uint8 frame (H, W, 3) or ``Frame``."""
    sizes = encoder_config(config)
    if isinstance(sizes, VggtConfig):
        return vggt_pixels(image, sizes.img_size, sizes.patch_size)
    return cut3r_pixels(image, config.cut3r_long_side)


def camera_input(image: np.ndarray | Frame, config: Loc3rConfig) -> torch.Tensor:
    """``camera_pixels`` as a tensor."""
    return _tensor(camera_pixels(image, config))


def cut3r_crop_box(width: int, height: int, patch: int = 16, square_ok: bool = False) -> tuple[int, int, int, int]:
    """CUT3R's centre crop of a resized ``width x height`` image to multiples of ``patch``.

    As in the reference: half sizes ``((2 * (W // 2)) // patch) * patch / 2`` around
    ``(W // 2, H // 2)``; a square image is cut to 4:3 (``halfh = 3 * halfw / 4``) unless
    ``square_ok``. Where that 4:3 height is not a multiple of ``patch`` (``W // patch`` not a
    multiple of 4; never at 512/16) it is floored to one, so the shape stays valid.
    """
    half = patch // 2
    cx, cy = width // 2, height // 2
    halfw, halfh = ((2 * cx) // patch) * half, ((2 * cy) // patch) * half
    if not square_ok and width == height:
        halfh = (3 * halfw // 4) // half * half
    return cx - halfw, cy - halfh, cx + halfw, cy + halfh


def cut3r_input(image: np.ndarray | Frame, long_side: int = 512, patch: int = 16, square_ok: bool = False) -> torch.Tensor:
    """``cut3r_pixels`` as a tensor."""
    return _tensor(cut3r_pixels(image, long_side, patch, square_ok))


def cut3r_pixels(image: np.ndarray | Frame, long_side: int = 512, patch: int = 16, square_ok: bool = False) -> np.ndarray:
    """CUT3R input for one RGB uint8 frame (H, W, 3), or a ``Frame``: a (3, H', W') float32
    array in [-1, 1].

    Long side resized to ``long_side`` (LANCZOS when shrinking, BICUBIC otherwise),
    centre-cropped to multiples of ``patch`` (``cut3r_crop_box``), then ``x / 255`` and
    ``(x - 0.5) / 0.5`` as torchvision's ToTensor + Normalize compute it. The reference's
    separate 224 mode (short-side resize + square crop) is not reproduced.
    """
    frame = _as_frame(image)
    width, height = frame.size
    longest = max(width, height)
    resample = Image.Resampling.LANCZOS if longest > long_side else Image.Resampling.BICUBIC
    size = tuple(max(1, round(x * long_side / longest)) for x in (width, height))
    left, top, right, bottom = cut3r_crop_box(*size, patch=patch, square_ok=square_ok)
    if right <= left or bottom <= top:
        raise InputError(
            f"a {width}x{height} frame is too narrow for {patch}-pixel patches at long side {long_side}",
            "use a video with an ordinary aspect ratio",
        )
    rgb = frame.resized(*size, resample)[top:bottom, left:right]
    pixels = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    pixels /= np.float32(255)  # float32 x / 255, then (x - 0.5) / 0.5, as ToTensor + Normalize
    pixels -= np.float32(0.5)
    pixels /= np.float32(0.5)
    return pixels


def vggt_input(image: np.ndarray | Frame, width: int = 518, patch: int = 14) -> torch.Tensor:
    """``vggt_pixels`` as a tensor."""
    return _tensor(vggt_pixels(image, width, patch))


def vggt_pixels(image: np.ndarray | Frame, width: int = 518, patch: int = 14) -> np.ndarray:
    """VGGT input for one RGB uint8 frame (H, W, 3) or ``Frame``: a (3, H', width) float32
    array in [0, 1].

    Width resized to ``width`` and height to the nearest multiple of ``patch`` keeping the
    aspect (BICUBIC), then ``x / 255``; a height above ``width`` (portrait) is
    centre-cropped to ``width``.
    """
    frame = _as_frame(image)
    source_width, source_height = frame.size
    height = round(source_height * (width / source_width) / patch) * patch
    if height < patch:
        raise InputError(
            f"a {source_width}x{source_height} frame is too flat for {patch}-pixel patches at width {width}",
            "use a video with an ordinary aspect ratio",
        )
    rgb = frame.resized(width, height, Image.Resampling.BICUBIC)
    top = max(height - width, 0) // 2
    pixels = np.ascontiguousarray(rgb[top : top + width].transpose(2, 0, 1), dtype=np.float32)
    pixels /= np.float32(255)
    return pixels


def siglip_input(images: Sequence[np.ndarray | Frame], size: int = 384) -> torch.Tensor:
    """``siglip_pixels`` as a tensor."""
    return _tensor(siglip_pixels(images, size))


def siglip_pixels(images: Sequence[np.ndarray | Frame], size: int = 384) -> np.ndarray:
    """SigLIP input for RGB uint8 frames or ``Frame``s: (N, 3, size, size) float32 in
    [-1, 1] (no aspect-preserving crop: frames are squashed, as LLaVA-Video does).

    As transformers' processor computes it: ``x * (1 / 255)`` in float64 cast to float32,
    then ``(x - 0.5) / 0.5`` in float32."""
    if len(images) == 0:
        raise ValueError("siglip_input needs at least one frame")
    rgbs = np.stack([_as_frame(image).resized(size, size, Image.Resampling.BICUBIC) for image in images])
    pixels = (rgbs.transpose(0, 3, 1, 2) * (1 / 255)).astype(np.float32)
    pixels -= np.float32(0.5)
    pixels /= np.float32(0.5)
    return pixels


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(pixels)


def _as_frame(image: np.ndarray | Frame) -> Frame:
    if isinstance(image, Frame):
        return image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    return Frame(0, 0.0, image)
