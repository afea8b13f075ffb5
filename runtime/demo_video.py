"""A small synthetic video (a textured room seen by a panning camera) for tests and the demo."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import av
import numpy as np

__all__ = ["main", "write_demo_video"]


def write_demo_video(
    path: str | Path,
    num_frames: int = 48,
    width: int = 320,
    height: int = 240,
    fps: int = 8,
    codec_options: dict[str, str] | None = None,
) -> Path:
    """Write a ``num_frames`` video of a camera panning across a room to ``path``.

    H.264 (libx264, yuv420p) when PyAV has it, else MPEG-4 Part 2, with the encoder's
    ``codec_options`` (e.g. ``{"preset": "veryfast", "g": "60"}``); the container follows
    the suffix (``.mp4`` gets ``+faststart``). Written to a temporary file in the same
    folder, then moved into place, so readers never see a partial file.
    """
    if num_frames < 1 or fps < 1:
        raise ValueError(f"num_frames and fps must be >= 1, got {num_frames}, {fps}")
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 16, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panorama = _room_panorama(width, height)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    options = {"movflags": "+faststart"} if path.suffix.lower() in (".mp4", ".mov") else {}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", options=options) as container:
            stream = container.add_stream(codec, rate=fps, options=codec_options or {})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(num_frames):
                frame = av.VideoFrame.from_ndarray(_view(panorama, i, num_frames, width, height), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _view(panorama: np.ndarray, i: int, n: int, width: int, height: int) -> np.ndarray:
    """Frame ``i``: a window sliding left to right with a slight vertical bob."""
    x = round(i * (panorama.shape[1] - width) / max(n - 1, 1))
    y = round((panorama.shape[0] - height) / 2 * (1 + np.sin(2 * np.pi * i / max(n, 2))))
    return np.ascontiguousarray(panorama[y : y + height, x : x + width])


def _room_panorama(width: int, height: int) -> np.ndarray:
    """A deterministic room strip 3x the frame width: ceiling, panelled walls with a door,
    a window and a table, a checkered floor, plus fine noise texture."""
    h, w = height + height // 8, 3 * width
    yy, xx = np.mgrid[0:h, 0:w]
    room = np.empty((h, w, 3), np.float32)
    ceiling, floor = int(0.15 * h), int(0.7 * h)
    room[:] = (225, 225, 215)
    panel = xx // max(w // 12, 1)
    wall_colors = np.array([(180, 150, 120), (150, 170, 190), (200, 190, 150), (160, 180, 150)], np.float32)
    wall = (yy >= ceiling) & (yy < floor)
    room[wall] = wall_colors[panel[wall] % len(wall_colors)]
    tile = max(height // 10, 2)
    checker = ((xx // tile + yy // tile) % 2).astype(bool)
    room[(yy >= floor) & checker] = (90, 70, 60)
    room[(yy >= floor) & ~checker] = (200, 185, 160)
    _box(room, 0.12, 0.35, 0.20, 0.70, w, h, (110, 70, 40))  # door
    _box(room, 0.45, 0.25, 0.60, 0.50, w, h, (170, 210, 240))  # window
    room[int(0.25 * h) : int(0.5 * h), int(0.525 * w) - 1 : int(0.525 * w) + 1] = (240, 240, 240)
    _box(room, 0.72, 0.55, 0.88, 0.62, w, h, (70, 50, 40))  # table top
    _box(room, 0.73, 0.62, 0.74, 0.78, w, h, (70, 50, 40))
    _box(room, 0.86, 0.62, 0.87, 0.78, w, h, (70, 50, 40))
    room += np.random.default_rng(0).normal(0, 8, room.shape).astype(np.float32)
    return np.clip(room, 0, 255).astype(np.uint8)


def _box(room: np.ndarray, x0: float, y0: float, x1: float, y1: float, w: int, h: int, color: tuple[int, int, int]) -> None:
    room[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = color


def main(argv: list[str] | None = None) -> None:
    """``python -m loc3r.runtime.demo_video PATH [--frames N] [--width W] [--height H] [--fps F]``."""
    parser = argparse.ArgumentParser(prog="python -m loc3r.runtime.demo_video", description=main.__doc__)
    parser.add_argument("path", type=Path, help="output video, e.g. demo.mp4")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        path = write_demo_video(args.path, args.frames, args.width, args.height, args.fps)
    except ValueError as exc:
        parser.error(str(exc))
    print(path)


if __name__ == "__main__":
    main()
