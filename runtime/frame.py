"""One sampled frame, and its pixels at whatever size an encoder asks for.

A frame from a decoder keeps the decoded picture (YUV, as FFmpeg gave it) and converts
it on demand: ``rgb`` at full size, or ``resized(width, height, filter)``. A shrink to at
most half of each side (1080p to an encoder's 512x288 or 384x384) is done by swscale on
the YUV planes before the colour conversion, so the frame never becomes a full-size RGB
array or goes through PIL; other sizes, and frames made from RGB arrays (raw frames on
stdin, tests), are resized with PIL, as the references do. The two routes differ by
about one grey level on average (swscale's and PIL's filter kernels, chroma): the bound
is measured in ``tests/test_preprocess.py`` and ``benchmarks/results/decode.md``.

Large frames: ``rgb`` of a picture whose long side exceeds ``MAX_DECODE_SIDE`` (2048) is
scaled down to that long side (area averaging, aspect ratio kept), so a 4K or 8K frame
never becomes a 25-100 MB array; frames up to 2048 (1080p, 2K) are untouched.
"""

from __future__ import annotations

import threading

import av
import numpy as np
from PIL import Image

MAX_DECODE_SIDE = 2048
# The decoder scales a picture when the target is at most 1/2 of it on both sides (1080p ->
# 512x288 or 384x384); smaller shrinks, and enlargements, go through PIL as the references do.
DECODER_SCALE_MIN = 2

Resample = Image.Resampling
_SWSCALE = {Resample.LANCZOS: "LANCZOS", Resample.BICUBIC: "BICUBIC", Resample.BILINEAR: "BILINEAR", Resample.NEAREST: "POINT", Resample.BOX: "AREA"}


class Frame:
    """A sampled frame: its index in the video, its time (seconds) and its pixels, from
    an RGB array (``rgb``) or a decoded picture (``picture``, converted on demand)."""

    def __init__(self, index: int, timestamp_s: float, rgb: np.ndarray | None = None, *, picture: av.VideoFrame | None = None) -> None:
        if (rgb is None) == (picture is None):
            raise ValueError("a Frame needs either rgb or picture")
        self.index = index
        self.timestamp_s = timestamp_s
        self._rgb = rgb
        self._picture = picture
        self._resized: dict[tuple[int, int, Resample], np.ndarray] = {}
        self._lock = threading.RLock()  # prepared in a decoding thread, read in the encoding one

    def __repr__(self) -> str:
        return f"Frame(index={self.index}, timestamp_s={self.timestamp_s}, size={self.size})"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed (after rotation)."""
        if self._rgb is not None:
            return self._rgb.shape[1], self._rgb.shape[0]
        width, height = self._picture.width, self._picture.height
        return (height, width) if _quarter_turns(self._picture.rotation) % 2 else (width, height)

    @property
    def rgb(self) -> np.ndarray:
        """RGB uint8 pixels (H, W, 3) as displayed; at most ``MAX_DECODE_SIDE`` on the long side."""
        with self._lock:
            if self._rgb is None:
                self._rgb = rotate_frame(frame_to_rgb(self._picture), self._picture.rotation)
            return self._rgb

    def resized(self, width: int, height: int, resample: Resample) -> np.ndarray:
        """RGB uint8 pixels (height, width, 3) as displayed, scaled with ``resample``:
        by swscale from the decoded picture, else by PIL from ``rgb``. Kept for reuse."""
        key = (width, height, resample)
        with self._lock:
            if key not in self._resized:
                self._resized[key] = self._scale(width, height, resample)
            return self._resized[key]

    def _scale(self, width: int, height: int, resample: Resample) -> np.ndarray:
        source_width, source_height = self.size
        if self._picture is not None and width * DECODER_SCALE_MIN <= source_width and height * DECODER_SCALE_MIN <= source_height:
            # scale the YUV planes (chroma at full target resolution), then convert: a
            # tighter bound on PIL's result at colour edges than scaling while converting
            stored = (height, width) if _quarter_turns(self._picture.rotation) % 2 else (width, height)
            yuv = self._picture.reformat(width=stored[0], height=stored[1], format="yuv444p", interpolation=_SWSCALE[resample])
            return rotate_frame(yuv.to_ndarray(format="rgb24"), self._picture.rotation)
        rgb = self.rgb
        if (source_width, source_height) == (width, height):
            return rgb
        return np.array(Image.fromarray(rgb).resize((width, height), resample))


def rotate_frame(rgb: np.ndarray, rotation_deg: int) -> np.ndarray:
    """Rotate pixels counter-clockwise by ``rotation_deg`` (a multiple of 90, as PyAV's
    ``VideoFrame.rotation`` reports the display matrix; other angles snap to the nearest
    quarter turn, mirror flags are ignored) so they come out as displayed."""
    quarter_turns = _quarter_turns(rotation_deg)
    if quarter_turns == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k=quarter_turns))


def _quarter_turns(rotation_deg: int) -> int:
    return round(rotation_deg / 90) % 4


def frame_to_rgb(frame: av.VideoFrame, max_side: int | None = None) -> np.ndarray:
    """RGB24 pixels of ``frame`` (H, W, 3); a frame whose long side exceeds ``max_side``
    (default ``MAX_DECODE_SIDE``) is scaled down to it, aspect kept, in the same conversion."""
    max_side = MAX_DECODE_SIDE if max_side is None else max_side
    longest = max(frame.width, frame.height)
    if longest <= max_side:
        return frame.to_ndarray(format="rgb24")
    scale = max_side / longest
    width, height = (max(1, round(side * scale)) for side in (frame.width, frame.height))
    return frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")
