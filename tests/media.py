"""Small media files the tests write with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_audio_only(path: Path) -> Path:
    """An m4a with a short silent AAC track and no video stream."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        for _ in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
