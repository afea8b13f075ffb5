"""Video probing, LLaVA-Video sampling and streaming decode on videos written with PyAV."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from media import write_audio_only
from hypothesis import given
from hypothesis import strategies as st

import loc3r.runtime.video as video_module
from loc3r.errors import InputError
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.video import (
    iter_frames,
    probe_video,
    read_video,
    rotate_frame,
    sample_indices,
)

RED, GREEN = (200, 40, 40), (40, 200, 40)


def _write(
    path: Path,
    frames: list[np.ndarray],
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    fps: int = 8,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    _need(codec)
    with av.open(str(path), mode="w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _need(codec: str) -> None:
    if codec not in av.codecs_available:  # PyAV wheels bundle these; system FFmpeg builds may not
        pytest.skip(f"this PyAV/FFmpeg build has no {codec} encoder")


def _flat(level: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), level, np.uint8)


def _halves(h: int = 48, w: int = 64) -> np.ndarray:
    """Left half red, right half green."""
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:, : w // 2], rgb[:, w // 2 :] = RED, GREEN
    return rgb


def _marked(h: int = 48, w: int = 64) -> np.ndarray:
    """Grey with a white block in the top-left quadrant."""
    rgb = _flat(60, h, w)
    rgb[: h // 2, : w // 2] = 255
    return rgb


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("demo") / "room.mp4")


@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 frames, frame i flat grey at level 20 + 5 i (h264 with B-frames: reordering);
    index at the front (faststart) so that a truncated copy still opens."""
    rng = np.random.default_rng(0)
    frames = [(_flat(20 + 5 * i) + rng.integers(-8, 9, (48, 64, 3))).astype(np.uint8) for i in range(40)]
    path = tmp_path_factory.mktemp("num") / "numbered.mp4"
    return _write(path, frames, fps=10, options={"movflags": "+faststart"})


# --- sampling ---------------------------------------------------------------------------


def test_sample_indices_match_llava_linspace() -> None:
    assert sample_indices(100, 8) == list(np.linspace(0, 99, 8, dtype=int))
    assert sample_indices(48, 8) == [0, 6, 13, 20, 26, 33, 40, 47]
    assert sample_indices(1000, 32) == np.linspace(0, 999, 32, dtype=int).tolist()


def test_sample_indices_short_video_repeats() -> None:
    assert sample_indices(3, 5) == [0, 0, 1, 1, 2]
    assert sample_indices(1, 4) == [0, 0, 0, 0]
    assert sample_indices(10, 1) == [0]


@pytest.mark.parametrize("total, num", [(0, 8), (10, 0), (-1, 3)])
def test_sample_indices_rejects_empty(total: int, num: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        sample_indices(total, num)


@given(st.integers(1, 100_000), st.integers(1, 256))
def test_sample_indices_properties(total: int, num: int) -> None:
    idx = sample_indices(total, num)
    assert len(idx) == num
    assert idx == sorted(idx)
    assert all(0 <= i < total for i in idx)
    assert idx[0] == 0
    if num >= 2:
        assert idx[-1] == total - 1
    if total >= num:
        assert len(set(idx)) == num


# --- probing and reading ----------------------------------------------------------------


def test_probe_demo_video(demo: Path) -> None:
    info = probe_video(demo)
    assert (info.total_frames, info.fps, info.duration_s) == (48, 8.0, 6.0)
    assert (info.width, info.height, info.rotation_deg) == (320, 240, 0)
    assert info.codec in ("h264", "mpeg4") and info.frame_count_exact
    assert info.display_size == (320, 240) and info.path == demo


def test_read_video_indices_timestamps_shapes(demo: Path) -> None:
    video = read_video(demo, 8)
    assert video.indices == [0, 6, 13, 20, 26, 33, 40, 47]
    assert video.timestamps == [i / 8 for i in video.indices]
    assert [f"{t:.2f}s" for t in video.timestamps][:3] == ["0.00s", "0.75s", "1.62s"]
    assert video.duration_s == 6.0 and video.info.total_frames == 48
    assert all(f.shape == (240, 320, 3) and f.dtype == np.uint8 for f in video.frames)
    assert not np.array_equal(video.frames[0], video.frames[1])  # the camera pans
    assert video.report.yielded == 8 and video.report.missing == 0 and video.report.complete


def test_sampled_frames_are_the_right_ones(numbered: Path) -> None:
    video = read_video(numbered, 7)
    assert video.indices == sample_indices(40, 7)
    levels = [float(f.mean()) for f in video.frames]
    assert levels == pytest.approx([20 + 5 * i for i in video.indices], abs=3)


def test_iter_frames_streams(numbered: Path) -> None:
    stream = iter_frames(numbered, 4)
    assert stream.indices == [0, 13, 26, 39]
    first = next(stream)
    assert first.index == 0 and stream.report.decoded_frames == 1  # yielded before decoding on
    rest = list(stream)
    assert [f.index for f in rest] == [13, 26, 39]
    assert [f.timestamp_s for f in rest] == [1.3, 2.6, 3.9]
    assert stream.report.decoded_frames == 40


def test_iter_frames_stops_early_when_consumer_breaks(numbered: Path) -> None:
    stream = iter_frames(numbered, 4)
    assert next(stream).index == 0
    stream.close()
    assert list(stream) == [] and not stream.report.complete


@pytest.mark.parametrize("w, h", [(64, 48), (176, 144), (320, 180), (98, 202)])
def test_sizes(tmp_path: Path, w: int, h: int) -> None:
    path = _write(tmp_path / "v.mp4", [_halves(h, w)] * 3)
    video = read_video(path, 2)
    assert video.frames[0].shape == (h, w, 3)
    assert video.frames[0][:, : w // 2 - 4].mean(axis=(0, 1)) == pytest.approx(RED, abs=6)


def test_one_frame_video(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.mp4", [_flat(90)])
    video = read_video(path, 8)
    assert video.indices == [0] * 8 and video.timestamps == [0.0] * 8
    assert len(video.frames) == 8 and all(np.array_equal(f, video.frames[0]) for f in video.frames)
    assert video.frames[1] is not video.frames[0]  # repeats are copies


def test_fewer_frames_than_requested(tmp_path: Path) -> None:
    path = _write(tmp_path / "five.mp4", [_flat(20 + 40 * i) for i in range(5)])
    video = read_video(path, 8)
    assert video.indices == [0, 0, 1, 1, 2, 2, 3, 4]
    assert [float(f.mean()) for f in video.frames] == pytest.approx([20 + 40 * i for i in video.indices], abs=3)
    assert video.report.missing == 0


# --- rotation ---------------------------------------------------------------------------


def test_rotate_frame_is_counter_clockwise() -> None:
    a = np.arange(6).reshape(2, 3)
    assert rotate_frame(a, 0) is a
    assert rotate_frame(a, 90).tolist() == [[2, 5], [1, 4], [0, 3]]
    assert rotate_frame(a, -90).tolist() == [[3, 0], [4, 1], [5, 2]]
    assert rotate_frame(a, 180).tolist() == rotate_frame(a, -180).tolist() == [[5, 4, 3], [2, 1, 0]]
    assert rotate_frame(a, 270).tolist() == rotate_frame(a, -90).tolist()
    assert rotate_frame(a, 90).flags.c_contiguous


# Display-matrix convention (FFmpeg's fftools autorotate): PyAV's `rotation` is the
# counter-clockwise angle, so rotation 90 turns the stored top-left corner to bottom-left.
@pytest.mark.parametrize(
    "rotation, corner", [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right"), (0, "top-left")]
)
def test_rotation_metadata_is_applied(tmp_path: Path, rotation: int, corner: str) -> None:
    path = _write(tmp_path / "rot.mp4", [_marked()] * 2, rotation=rotation)
    info = probe_video(path)
    assert info.rotation_deg % 360 == rotation % 360
    rgb = read_video(path, 1).frames[0]
    expected = (48, 64, 3) if rotation % 180 == 0 else (64, 48, 3)
    assert rgb.shape == expected and info.display_size == (expected[1], expected[0])
    h, w = rgb.shape[:2]
    quads = {
        "top-left": rgb[: h // 2 - 4, : w // 2 - 4],
        "top-right": rgb[: h // 2 - 4, w // 2 + 4 :],
        "bottom-left": rgb[h // 2 + 4 :, : w // 2 - 4],
        "bottom-right": rgb[h // 2 + 4 :, w // 2 + 4 :],
    }
    assert {name for name, q in quads.items() if q.mean() > 200} == {corner}


# --- pixel formats ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec, pix_fmt, suffix",
    [
        ("libx264", "yuv420p10le", "mp4"),
        ("ffv1", "gray", "mkv"),
        ("ffv1", "gray16le", "mkv"),
        ("png", "rgba", "mov"),
        ("ffv1", "bgra", "mkv"),
        ("mpeg4", "yuv420p", "avi"),
    ],
)
def test_pixel_formats_come_out_rgb_uint8(tmp_path: Path, codec: str, pix_fmt: str, suffix: str) -> None:
    path = _write(tmp_path / f"v.{suffix}", [_halves()] * 3, codec=codec, pix_fmt=pix_fmt)
    rgb = read_video(path, 2).frames[0]
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    left, right = rgb[:, :24].mean(axis=(0, 1)), rgb[:, 40:].mean(axis=(0, 1))
    if pix_fmt.startswith("gray"):  # luma only: both halves grey, green brighter than red
        assert np.ptp(left) < 3 and np.ptp(right) < 3 and right[0] > left[0] + 40
    else:
        assert left == pytest.approx(RED, abs=6) and right == pytest.approx(GREEN, abs=6)


def test_mkv_frame_count_estimate_and_counting(tmp_path: Path) -> None:
    path = _write(tmp_path / "v.mkv", [_flat(20 + 10 * i) for i in range(11)], codec="ffv1", pix_fmt="gray")
    estimated = probe_video(path)
    assert estimated.total_frames == 11 and not estimated.frame_count_exact
    counted = probe_video(path, count_frames=True)
    assert counted.total_frames == 11 and counted.frame_count_exact
    assert read_video(path, 3).indices == [0, 5, 10]


# --- damaged files ----------------------------------------------------------------------


def _truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def test_truncated_mp4_yields_what_is_decodable(
    tmp_path: Path, numbered: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cut = _truncate(numbered, tmp_path / "cut.mp4", 0.5)  # faststart: index says 40 frames
    with caplog.at_level(logging.WARNING, logger="loc3r.runtime.video"):
        stream = iter_frames(cut, 8)
        frames = list(stream)
    assert stream.info.total_frames == 40
    assert 0 < len(frames) < 8 and stream.report.missing == 8 - len(frames)
    assert [f.index for f in frames] == stream.indices[: len(frames)]
    assert "sampled frames were decodable" in caplog.text


@pytest.mark.parametrize("extra, substituted", [(1, 1), (2, 1), (10, 0)])
def test_header_overcount(numbered: Path, monkeypatch: pytest.MonkeyPatch, extra: int, substituted: int) -> None:
    """A header a frame or two too long (edit lists) still gives every sampled frame;
    more than that is treated as truncation."""
    real_probe = video_module._probe

    def overcounted(path: Path, count_frames: bool) -> tuple:
        info, index = real_probe(path, count_frames)
        return replace(info, total_frames=40 + extra), index

    monkeypatch.setattr(video_module, "_probe", overcounted)
    stream = iter_frames(numbered, 8)
    frames = list(stream)
    assert stream.indices == sample_indices(40 + extra, 8)
    assert stream.report.substituted == substituted
    if substituted:
        assert len(frames) == 8 and frames[-1].index == 39 and frames[-1].timestamp_s == 3.9
    else:
        decodable = [i for i in stream.indices if i < 40]
        assert [f.index for f in frames] == decodable and stream.report.missing == 8 - len(decodable)


def test_truncated_mkv_samples_what_is_there(tmp_path: Path) -> None:
    frames = [np.random.default_rng(i).integers(0, 255, (48, 64, 3), np.uint8) for i in range(40)]
    full = _write(tmp_path / "full.mkv", frames)
    video = read_video(_truncate(full, tmp_path / "cut.mkv", 0.5), 8)
    assert 0 < video.info.total_frames < 40 and video.info.frame_count_exact
    assert video.indices == sample_indices(video.info.total_frames, 8)
    assert video.report.missing == 0


def test_truncated_to_nothing_fails(tmp_path: Path, numbered: Path) -> None:
    with av.open(str(numbered)) as container:
        first_packet = next(container.demux()).pos
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(numbered.read_bytes()[: first_packet + 10])  # header, no whole frame
    with pytest.raises(InputError, match="no decodable video frames"):
        read_video(cut, 8)


def test_truncated_mp4_without_index_fails(tmp_path: Path) -> None:
    full = _write(tmp_path / "full.mp4", [_flat(20 + 5 * i) for i in range(20)])  # moov at the end
    with pytest.raises(InputError, match="cannot be read as a video.*damaged"):
        read_video(_truncate(full, tmp_path / "cut.mp4", 0.9), 8)


# --- input errors -----------------------------------------------------------------------


def _audio_only(path: Path) -> Path:
    _need("aac")
    return write_audio_only(path)


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _png_as_mp4(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(_flat(30)).save(path, format="PNG")
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: d, "is a directory"),
        (lambda d: _file(d / "empty.mp4", b""), "empty file"),
        (lambda d: _file(d / "notes.mp4", b"hello\n" * 50), "cannot be read as a video"),
        (lambda d: _png_as_mp4(d / "still.mp4"), "is a still image"),
        (lambda d: _audio_only(d / "sound.m4a"), "has only audio"),
    ],
    ids=["missing", "directory", "empty", "text", "png", "audio"],
)
def test_input_errors(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    for call in (lambda: probe_video(path), lambda: read_video(path, 4)):
        with pytest.raises(InputError, match=message) as err:
            call()
        text = str(err.value)
        assert str(path) in text and "\n" not in text and err.value.fix and err.value.exit_code == 2


# --- demo video -------------------------------------------------------------------------


def test_demo_video_is_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "demo.mp4"
    assert write_demo_video(target, num_frames=5, width=64, height=48, fps=5) == target
    assert sorted(os.listdir(target.parent)) == ["demo.mp4"]
    assert os.stat(target).st_mode & 0o777 == 0o644
    info = probe_video(target)
    assert (info.total_frames, info.width, info.height, info.fps) == (5, 64, 48, 5.0)


def test_demo_video_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_demo_video(tmp_path / "odd.mp4", width=65)
    with pytest.raises(Exception):
        write_demo_video(tmp_path / "demo.unknownformat", num_frames=2, width=64, height=48)
    assert os.listdir(tmp_path) == []


def test_demo_video_module_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loc3r.runtime.demo_video import main

    main([str(tmp_path / "d.mp4"), "--frames", "3", "--width", "32", "--height", "16"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "d.mp4")
    assert probe_video(tmp_path / "d.mp4").total_frames == 3
    with pytest.raises(SystemExit):
        main([str(tmp_path / "e.mp4"), "--width", "33"])
