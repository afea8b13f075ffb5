"""Frame preprocessing for the image encoders: CUT3R or VGGT (camera tokens) and SigLIP (vision tokens).

``cut3r_input`` reproduces CUT3R's ``load_images`` (src/dust3r/utils/image.py) on decoded
RGB frames; ``vggt_input`` VGGT's ``load_and_preprocess_images`` (crop mode,
vggt/utils/load_fn.py); ``camera_input`` picks the bundle's; ``siglip_input`` uses transformers' PIL SigLIP processor configured as
LLaVA-Video's ``SigLipImageProcessor`` (squash to size x size, bicubic, mean = std = 0.5).
Given RGB arrays, all three resize with PIL as the references do; given decoded ``Frame``s,
the resize happens in the decoder's colour conversion (swscale, same filters), within a
measured bound of the PIL route (``loc3r.runtime.frame``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from transformers import SiglipImageProcessorPil
from transformers.image_utils import PILImageResampling

from loc3r.errors import InputError
from loc3r.models.config import Loc3rConfig
from loc3r.models.encoder3d import encoder_config
from loc3r.models.vggt import VggtConfig
from loc3r.runtime.frame import Frame

__all__ = ["camera_input", "cut3r_crop_box", "cut3r_input", "siglip_input", "vggt_input"]


def camera_input(image: np.ndarray | Frame, config: Loc3rConfig) -> torch.Tensor:
    """The bundle's 3D-encoder input for one RGB uint8 frame (H, W, 3) or ``Frame``."""
    sizes = encoder_config(config)
    if isinstance(sizes, VggtConfig):
        return vggt_input(image, sizes.img_size, sizes.patch_size)
    return cut3r_input(image, config.cut3r_long_side)


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
    """CUT3R input for one RGB uint8 frame (H, W, 3), or a ``Frame``: a (3, H', W') float32
    tensor in [-1, 1].

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
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    return pixels.to(torch.float32).div(255).sub_(0.5).div_(0.5)


def vggt_input(image: np.ndarray | Frame, width: int = 518, patch: int = 14) -> torch.Tensor:
    """VGGT input for one RGB uint8 frame (H, W, 3) or ``Frame``: a (3, H', width) float32
    tensor in [0, 1].

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
    pixels = torch.from_numpy(np.ascontiguousarray(frame.resized(width, height, Image.Resampling.BICUBIC)))
    top = max(height - width, 0) // 2
    return pixels[top : top + width].permute(2, 0, 1).to(torch.float32).div_(255)


def siglip_input(images: Sequence[np.ndarray | Frame], size: int = 384) -> torch.Tensor:
    """SigLIP input for RGB uint8 frames or ``Frame``s: (N, 3, size, size) float32 in
    [-1, 1] (no aspect-preserving crop: frames are squashed, as LLaVA-Video does)."""
    if len(images) == 0:
        raise ValueError("siglip_input needs at least one frame")
    rgbs = [_as_frame(image).resized(size, size, Image.Resampling.BICUBIC) for image in images]
    out = _siglip_processor(size)(images=rgbs, return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"]


@lru_cache(maxsize=4)
def _siglip_processor(size: int) -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(
        size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _as_frame(image: np.ndarray | Frame) -> Frame:
    if isinstance(image, Frame):
        return image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    return Frame(0, 0.0, image)
