"""Seeking to keyframes gives exactly the frames sequential decoding gives, across
containers, codecs, B-frames, open GOPs, variable frame rate and damaged indexes."""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from loc3r.runtime.frame_index import FrameIndex, KeyFrame, plan_reads
from loc3r.runtime.video import FrameStream, sample_indices

FRAMES = 120
VFR_STEPS_MS = (40, 20, 80, 33)


def write_video(path: Path, codec: str, gop: int = 12, b_frames: int = 2, vfr: bool = False) -> Path:
    """``FRAMES`` frames of noise with a moving bar (every frame differs), keyframes every
    ``gop``; with ``vfr`` the frame durations cycle through ``VFR_STEPS_MS``."""
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV/FFmpeg build has no {codec} encoder")
    rng = np.random.default_rng(0)
    width, height = 96, 64
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25, options={"x265-params": "log-level=none"} if codec == "libx265" else {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = b_frames
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(FRAMES):
            rgb = (rng.integers(0, 40, (height, width, 3)) + (2 * i) % 200).astype(np.uint8)
            rgb[: height // 2, : i % width] = 255
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if vfr:
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                pts += VFR_STEPS_MS[i % len(VFR_STEPS_MS)]
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def assert_same_frames(path: Path, num_frames: int) -> FrameStream:
    """Sampled frames with seeking == without, pixel for pixel; the seeking stream."""
    sequential = list(FrameStream(path, num_frames, seek=False))
    stream = FrameStream(path, num_frames)
    seeking = list(stream)
    assert [f.index for f in seeking] == [f.index for f in sequential] == sample_indices(FRAMES, num_frames)
    assert [f.timestamp_s for f in seeking] == [f.timestamp_s for f in sequential]
    for a, b in zip(seeking, sequential, strict=True):
        np.testing.assert_array_equal(a.rgb, b.rgb)
    return stream


CASES = [
    ("mp4", "libx264", {}),  # B-frames, closed GOP
    ("mkv", "libx264", {}),
    ("webm", "libvpx-vp9", {}),
    ("webm", "libvpx", {}),
    ("avi", "mpeg4", {}),  # packed B-frames, open GOP
    ("mov", "mpeg2video", {}),  # open GOP
    ("mp4", "libx265", {}),  # open GOP (CRA)
    ("mp4", "libx264", {"vfr": True}),
    ("mkv", "libx264", {"vfr": True}),
]


@pytest.mark.parametrize("suffix, codec, options", CASES, ids=[f"{c}-{s}{'-vfr' if o else ''}" for s, c, o in CASES])
def test_sparse_sampling_seeks_and_gives_the_sequential_frames(tmp_path: Path, suffix: str, codec: str, options: dict) -> None:
    path = write_video(tmp_path / f"v.{suffix}", codec, **options)
    stream = assert_same_frames(path, 5)
    assert any(read.seek_to for read in stream.reads)
    assert stream.report.decoded_frames < FRAMES  # whole groups of pictures were skipped
    assert_same_frames(path, 8)


def test_dense_sampling_does_not_seek(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mp4", "libx264")
    stream = assert_same_frames(path, 32)
    assert not any(read.seek_to for read in stream.reads)


def test_non_reference_pictures_between_samples_are_skipped(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.avi", "mpeg4", gop=300)  # one keyframe: no seeks, B-frames are never references
    stream = assert_same_frames(path, 32)
    assert not any(read.seek_to for read in stream.reads)
    assert stream.report.decoded_frames < FRAMES


def test_a_damaged_index_falls_back_to_sequential_decoding(tmp_path: Path) -> None:
    """Keyframe entries (mp4 ``stss``) pointing 5 frames past the real keyframes: seeks land
    on frames the index does not know, and the reader decodes sequentially instead."""
    path = write_video(tmp_path / "v.mp4", "libx264", gop=11)
    data = bytearray(path.read_bytes())
    box = data.find(b"stss")
    count = struct.unpack(">I", data[box + 8 : box + 12])[0]
    for k in range(1, count):
        at = box + 12 + 4 * k
        data[at : at + 4] = struct.pack(">I", struct.unpack(">I", data[at : at + 4])[0] + 5)
    path.write_bytes(bytes(data))
    stream = assert_same_frames(path, 5)
    assert any(read.seek_to for read in stream.reads)
    assert stream.report.decoded_frames > FRAMES  # the plan was left, everything decoded again


def test_truncated_file_with_a_whole_index_gives_what_sequential_gives(tmp_path: Path) -> None:
    full = write_video(tmp_path / "full.mp4", "libx264")
    with av.open(str(full)) as source, av.open(str(tmp_path / "fast.mp4"), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    data = (tmp_path / "fast.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])  # the index (at the front) still lists every frame
    sequential = list(FrameStream(cut, 5, seek=False))
    seeking = list(FrameStream(cut, 5))
    assert [f.index for f in seeking] == [f.index for f in sequential] and 0 < len(seeking) < 5
    for a, b in zip(seeking, sequential, strict=True):
        np.testing.assert_array_equal(a.rgb, b.rgb)


def index_with(keyframes: list[int], total: int = 1000) -> FrameIndex:
    return FrameIndex(total, tuple(KeyFrame(k, k, k, k) for k in keyframes), complete=True)


def test_plan_seeks_only_when_it_skips_more_than_a_seek_costs() -> None:
    index = index_with(list(range(0, 1000, 100)))
    plan = plan_reads(index, [0, 450, 470, 999], seek_cost=12)
    assert [(r.target, r.seek_to.index if r.seek_to else None) for r in plan] == [(0, None), (450, 400), (470, None), (999, 900)]
    # a keyframe just past the last target is not worth a seek
    assert plan_reads(index, [0, 95, 105], seek_cost=12)[2].seek_to is None
    assert plan_reads(index, [0, 50, 150], seek_cost=12)[2].seek_to.index == 100
    # repeated targets (short videos) are read once
    assert [r.target for r in plan_reads(index, [0, 0, 1, 1])] == [0, 1]
