"""Live frame sources: a camera device, a network stream, or raw RGB frames on stdin.

Frames are taken at a fixed stride up to a maximum count; timestamps are the source's
own (seconds since its first frame).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import BinaryIO

import av
import numpy as np

from loc3r.errors import InputError
from loc3r.runtime.frame import Frame
from loc3r.runtime.video import video_stream

NETWORK_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


def is_live_source(spec: str) -> bool:
    return spec == "-" or spec.startswith("camera:") or spec.startswith(NETWORK_SCHEMES)


def live_frames(
    spec: str, stride: int, max_frames: int, frame_size: tuple[int, int] | None = None, fps: float = 30.0, stdin: BinaryIO | None = None
) -> Iterator[Frame]:
    """Every ``stride``-th frame of the source, at most ``max_frames`` of them. The source is
    opened here, so one that cannot be opened or has no video fails at once (in the caller's
    thread); frames are read as the iterator is consumed."""
    if stride < 1 or max_frames < 1:
        raise InputError("--stride and --frames must be at least 1", "pass positive numbers")
    if spec == "-":
        if frame_size is None:
            raise InputError("raw frames on stdin need their size", "pass --frame-size WIDTHxHEIGHT (RGB24, 8 bits per channel)")
        frames = raw_rgb_frames(stdin or sys.stdin.buffer, frame_size, fps)
    else:
        frames = container_frames(spec)
    return itertools.islice(frames, 0, stride * (max_frames - 1) + 1, stride)


def raw_rgb_frames(stream: BinaryIO, frame_size: tuple[int, int], fps: float) -> Iterator[Frame]:
    """Packed RGB24 frames of ``frame_size`` (width, height) read from ``stream`` until EOF."""
    width, height = frame_size
    frame_bytes = width * height * 3
    index = 0
    while True:
        data = stream.read(frame_bytes)
        if not data:
            return
        if len(data) < frame_bytes:
            raise InputError(
                f"stdin ended inside a frame ({len(data)} of {frame_bytes} bytes)",
                "send whole RGB24 frames of the --frame-size given",
            )
        yield Frame(index, index / fps, np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy())
        index += 1


def container_frames(spec: str) -> Iterator[Frame]:
    """Frames of a camera (``camera:N`` -> /dev/videoN through v4l2) or a network stream."""
    if spec.startswith("camera:"):
        device = spec.split(":", 1)[1]
        url, options = (f"/dev/video{device}" if device.isdigit() else device), {"format": "v4l2"}
    else:
        url, options = spec, {"options": {"rtsp_transport": "tcp"}} if spec.startswith("rtsp://") else {}
    try:
        container = av.open(url, mode="r", timeout=10.0, **options)
    except (av.FFmpegError, OSError) as exc:
        raise InputError(f"cannot open live source {spec} ({exc})", "check the device or URL and that it is streaming") from None
    try:
        stream = video_stream(container, spec)
    except InputError:
        container.close()
        raise
    return _decoded(container, stream)


def _decoded(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[Frame]:
    """The stream's frames, stamped from its first one; the container closes at the end."""
    with container:
        first: float | None = None
        for index, frame in enumerate(container.decode(stream)):
            stamp = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 30)
            first = stamp if first is None else first
            yield Frame(index, stamp - first, picture=frame)
