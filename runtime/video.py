"""Video input: probe a file, sample frames uniformly (LLaVA-Video), decode them with PyAV.

Only the sampled frames are kept, as decoded pictures (converted to RGB, or scaled to an
encoder's input, on demand: ``loc3r.runtime.frame``), so memory stays flat whatever the
video length. Sparse samples of a long video are reached by seeking to keyframes, dense
ones by decoding on (``loc3r.runtime.frame_index``); the frames are the same either way.
Timestamps follow LLaVA-Video: ``index / fps`` (for a variable-frame-rate video ``fps`` is
the average rate, as in LLaVA-Video's decord reader). Streams over ``MAX_DECODE_PIXELS``
(8192x8192) are refused before decoding.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import numpy as np

from loc3r.errors import InputError
from loc3r.runtime.frame import MAX_DECODE_SIDE, Frame, frame_to_rgb, rotate_frame
from loc3r.runtime.frame_index import FrameIndex, Read, index_from_entries, plan_reads, scan_packets
from loc3r.runtime.keyframe_reader import KeyframeReader, LostTrack

log = logging.getLogger(__name__)

__all__ = [
    "MAX_DECODE_SIDE",
    "Frame",
    "FrameStream",
    "SampledFrames",
    "SampledVideo",
    "VideoInfo",
    "VideoDecoder",
    "VideoReadReport",
    "frame_to_rgb",
    "iter_frames",
    "probe_video",
    "read_video",
    "rotate_frame",
    "sample_indices",
    "video_stream",
]

MAX_DECODE_PIXELS = 8192 * 8192

_FIX_OPEN = "pass a video file (mp4, mkv, mov, webm, avi)"
_FIX_DAMAGED = "the file is damaged or truncated; re-export or re-copy it"


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream.

    ``width``/``height`` are the stored (coded) size; frames come out rotated by
    ``rotation_deg`` (counter-clockwise), see ``display_size``. ``duration_s`` is
    ``total_frames / fps`` as LLaVA-Video computes the video length.
    ``frame_count_exact`` is False when ``total_frames`` was estimated from duration x fps.
    """

    path: Path
    total_frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    rotation_deg: int
    codec: str
    frame_count_exact: bool

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) of the frames as yielded, after rotation."""
        if self.rotation_deg % 180:
            return self.height, self.width
        return self.width, self.height


@dataclass
class VideoReadReport:
    """How a read went: filled in while frames are yielded, final once ``complete``.

    ``decoded_frames``: frames that came out of the decoder (decoding stops after the last
    sampled one; seeking and skipped non-reference pictures make it smaller);
    ``decode_errors``: packets that failed to decode or demux; ``substituted``: sampled
    indices past the real end of a stream whose header over-counted by at most a couple
    of frames, served by the last decoded frame (with its true index and time).
    """

    requested: int
    yielded: int = 0
    decoded_frames: int = 0
    decode_errors: int = 0
    substituted: int = 0
    complete: bool = False

    @property
    def missing(self) -> int:
        """Sampled frames that could not be decoded (truncated or corrupt file)."""
        return self.requested - self.yielded


@dataclass(frozen=True)
class SampledVideo:
    """Uniformly sampled frames of a video, with what the LLaVA-Video prompt needs."""

    frames: list[np.ndarray]
    indices: list[int]
    timestamps: list[float]
    duration_s: float
    info: VideoInfo
    report: VideoReadReport = field(compare=False)


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """LLaVA-Video uniform sampling: ``np.linspace(0, total_frames - 1, num_frames, dtype=int)``.

    Policy for short videos (``total_frames < num_frames``): indices repeat, exactly as
    linspace gives them (``sample_indices(3, 5) == [0, 0, 1, 1, 2]``), so the model always
    sees ``num_frames`` frames and fixed-shape engines keep one input shape.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.linspace(0, total_frames - 1, num_frames, dtype=int).tolist()


def probe_video(path: str | Path, count_frames: bool = False) -> VideoInfo:
    """Read the stream metadata of ``path`` (decodes at most the first frame, for rotation).

    Frame count: the stream's frame count (mp4/mov/avi headers) when present, else
    ``duration x fps`` (mkv, webm, ts: flagged inexact), or a counting pass over the
    packets (no decoding) when ``count_frames`` is set or no duration is known.
    """
    return _probe(path, count_frames)[0]


def _probe(path: str | Path, count_frames: bool) -> tuple[VideoInfo, FrameIndex | None]:
    """``probe_video`` and, when it was read on the way (``count_frames``), the frame index."""
    path = _check_path(path)
    index = None
    with _open(path) as container:
        stream = video_stream(container, path)
        fps = _fps(stream, path)
        total, exact = stream.frames, True
        if total <= 0:
            total, exact = _estimate_frames(container, stream, fps), False
        _check_frame_size(stream, path)
        rotation = _first_frame_rotation(container, stream)
        if count_frames:
            index = index_from_entries(stream)
        width, height, codec = stream.width, stream.height, stream.codec_context.name
    if (count_frames and index is None) or total <= 0:
        with _open(path) as container:
            index = scan_packets(container, video_stream(container, path))
    if index is not None and (not exact or total <= 0):
        total, exact = index.total_frames, True
    if total <= 0:
        raise InputError(f"{path}: no decodable video frames", _FIX_DAMAGED)
    info = VideoInfo(
        path=path,
        total_frames=total,
        fps=fps,
        duration_s=total / fps,
        width=width,
        height=height,
        rotation_deg=rotation,
        codec=codec,
        frame_count_exact=exact,
    )
    return info, index


class FrameStream(Iterator[Frame]):
    """Iterator over the sampled frames of one video, with its ``info``, ``indices``
    and a ``report`` that says how many sampled frames were actually decodable.

    Frames are decoded sequentially, except that when the container's index is sound
    and the samples are sparse the reader seeks to the keyframe before a sampled frame
    instead of decoding the frames in between (``loc3r.runtime.frame_index``); the
    frames are the same either way. ``seek=False`` always decodes sequentially.
    """

    def __init__(self, path: str | Path, num_frames: int, seek: bool = True) -> None:
        self.info, index = _probe(path, count_frames=True)
        self.indices = sample_indices(self.info.total_frames, num_frames)
        self.report = VideoReadReport(requested=num_frames)
        self._wanted = frozenset(self.indices)
        self.reads = self._plan(index) if seek else None  # None: sequential
        self._frames = self._generate()

    def __next__(self) -> Frame:
        return next(self._frames)

    def close(self) -> None:
        """Stop early and release the file (also happens when the stream is exhausted)."""
        self._frames.close()

    def _plan(self, index: FrameIndex | None) -> list[Read] | None:
        """The reading plan, or None (sequential) when the index is unsound."""
        if index is None or not index.complete or index.total_frames != self.info.total_frames:
            return None
        self._index = index
        return plan_reads(index, self.indices)

    def _generate(self) -> Iterator[Frame]:
        info, report = self.info, self.report
        targets = _Targets(self.indices)
        if self.reads is not None:
            try:
                yield from self._planned(targets)
            except LostTrack as reason:  # a damaged index, frames without timestamps: sequential takes over
                log.debug("%s: left the reading plan (%s), decoding the rest sequentially", info.path, reason)
        if targets.current is not None:
            yield from self._sequential(targets)
        report.complete = True
        if report.yielded == 0:
            raise InputError(f"{info.path}: no decodable video frames", _FIX_DAMAGED)
        if report.missing:
            log.warning(
                "%s: only %d of %d sampled frames were decodable (file truncated or corrupt)",
                info.path, report.yielded, report.requested,
            )

    def _sequential(self, targets: _Targets) -> Iterator[Frame]:
        """Decode every frame from the start, yielding the remaining targets as they come."""
        info, report = self.info, self.report
        last: tuple[int, av.VideoFrame] | None = None
        decoded = 0
        with _open(info.path) as container:
            stream = video_stream(container, info.path)
            for index, frame in enumerate(_decode(container, stream, report)):
                decoded = index + 1
                report.decoded_frames += 1
                last = index, frame
                if targets.current == index:
                    yield from self._emit(index, frame, targets, until=index)
                if targets.current is None:
                    break
            if targets.current is not None and last and decoded >= info.total_frames - _count_slack(info):
                before = report.yielded  # the header over-counted by a frame or two: use the last one
                yield from self._emit(*last, targets, until=info.total_frames)
                report.substituted = report.yielded - before

    def _planned(self, targets: _Targets) -> Iterator[Frame]:
        """Follow the plan: seek where it says, decode up to each target, yield it."""
        path = self.info.path
        with _open(path) as container:
            stream = video_stream(container, path)
            frames: Generator | None = None  # the reader the last read left off in
            try:
                for read in self.reads:
                    frame, frames = self._read(container, stream, frames, read)
                    yield from self._emit(read.target, frame, targets, until=read.target)
            finally:
                if frames is not None:
                    frames.close()

    def _read(
        self, container: av.container.InputContainer, stream: av.VideoStream, frames: Generator | None, read: Read
    ) -> tuple[av.VideoFrame, Generator]:
        """Frame ``read.target`` and the frames that follow it. A seek that lands after the
        target (a leading picture of the keyframe's open GOP) is retried from the keyframe
        before, twice at most."""
        keyframe = read.seek_to
        for _ in range(3):
            if keyframe is not None or frames is None:
                if frames is not None:
                    frames.close()
                frames = iter(KeyframeReader(container, stream, self._index, keyframe, self._wanted, self._count_decoded))
            for number, frame in frames:
                if number == read.target:
                    return frame, frames
                if number > read.target:
                    break
            else:
                raise LostTrack(f"the stream ended before frame {read.target}")
            if keyframe is None:
                raise LostTrack(f"decoding on went past frame {read.target}")
            keyframe = self._index.keyframe_at_or_before(keyframe.index - 1)
            if keyframe is None:
                break
        raise LostTrack(f"no keyframe before frame {read.target} could be decoded from")

    def _count_decoded(self) -> None:
        self.report.decoded_frames += 1

    def _emit(self, index: int, frame: av.VideoFrame, targets: _Targets, until: int) -> Iterator[Frame]:
        """Yield frame ``index`` for the current target and each following one up to
        ``until`` (repeats are separate ``Frame`` objects over the same picture)."""
        while targets.current is not None and targets.current <= until:
            self.report.yielded += 1
            yield Frame(index, index / self.info.fps, picture=frame)
            targets.advance()


class _Targets:
    """The sampled frame numbers still to yield, in order."""

    def __init__(self, indices: list[int]) -> None:
        self._rest = iter(indices)
        self.current: int | None = next(self._rest, None)

    def advance(self) -> None:
        self.current = next(self._rest, None)


class SampledFrames(Protocol):
    """What a video decoder gives the pipeline: the sampled frames in order (each as soon
    as it is decoded), the stream's ``info``, the sampled ``indices`` and a ``report``.
    :class:`FrameStream` is the PyAV one; see docs/architecture.md for plugging in another
    (e.g. a Jetson hardware decoder)."""

    info: VideoInfo
    indices: list[int]
    report: VideoReadReport

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


# Opens ``path`` and samples ``num_frames`` of it; ``iter_frames`` is the default.
VideoDecoder = Callable[[str | Path, int], SampledFrames]


def iter_frames(path: str | Path, num_frames: int) -> FrameStream:
    """Stream ``num_frames`` uniformly sampled frames of ``path`` in order, each as soon as
    it is decoded. A truncated file yields what is decodable (see ``FrameStream.report``);
    ``InputError`` if no frame at all could be decoded."""
    return FrameStream(path, num_frames)


def read_video(path: str | Path, num_frames: int) -> SampledVideo:
    """Decode ``num_frames`` uniformly sampled frames of ``path`` into memory."""
    stream = iter_frames(path, num_frames)
    frames = list(stream)
    return SampledVideo(
        frames=[f.rgb for f in frames],
        indices=[f.index for f in frames],
        timestamps=[f.timestamp_s for f in frames],
        duration_s=stream.info.duration_s,
        info=stream.info,
        report=stream.report,
    )


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file", "check the path to the video")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a video file", "pass the path of one video file")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise InputError(f"{path}: is {kind}, not a video file", "pass a video file; for a stream of frames use --source")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: is an empty file (0 bytes)", "re-copy or re-record the video")
    return path


def _open(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path), mode="r", metadata_errors="replace")  # damaged tags are not fatal
    except av.FFmpegError as exc:
        raise InputError(
            f"{path}: cannot be read as a video ({exc.strerror or exc})",
            f"it is not a video or it is damaged; {_FIX_OPEN}",
        ) from exc
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):
        container.close()
        raise InputError(f"{path}: is a still image ({fmt}), not a video", _FIX_OPEN)
    return container


def video_stream(container: av.container.InputContainer, path: Path | str) -> av.VideoStream:
    """The first decodable video stream (cover art excluded), or an ``InputError`` saying
    what the file or source holds instead."""
    streams = [
        s for s in container.streams.video
        if not s.disposition & av.stream.Disposition.attached_pic
    ]
    if streams:
        decodable = [s for s in streams if s.codec_context is not None]
        if not decodable:
            raise InputError(
                f"{path}: its video stream has a codec this FFmpeg build cannot decode",
                "the file is damaged, or re-encode it, e.g. to H.264",
            )
        return decodable[0]
    kinds = sorted({s.type for s in container.streams})
    if not kinds:
        raise InputError(f"{path}: contains no streams", _FIX_DAMAGED)
    if kinds == ["audio"]:
        raise InputError(f"{path}: has only audio, no video stream", _FIX_OPEN)
    raise InputError(f"{path}: has no video stream (only {', '.join(kinds)})", _FIX_OPEN)


def _check_frame_size(stream: av.VideoStream, path: Path) -> None:
    """Refuse frames too large to decode safely (FFmpeg itself allows about 16k x 16k)."""
    width, height = stream.width or 0, stream.height or 0
    if width * height > MAX_DECODE_PIXELS:
        raise InputError(
            f"{path}: frames of {width}x{height} are larger than loc3r decodes (at most 8192x8192 pixels)",
            "scale the video down first, e.g. ffmpeg -i IN -vf scale=1920:-2 OUT.mp4",
        )


def _fps(stream: av.VideoStream, path: Path) -> float:
    rate: Fraction | None = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise InputError(f"{path}: the video stream has no frame rate", "re-mux the video, e.g. to mp4")
    return float(rate)


def _estimate_frames(container: av.container.InputContainer, stream: av.VideoStream, fps: float) -> int:
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        return 0
    return round(seconds * fps)


def _count_slack(info: VideoInfo) -> int:
    """Frames a header may over-count (edit lists, a dropped tail frame) before a short
    stream counts as truncated rather than as a miscounted one."""
    return max(2, info.total_frames // 100)


def _first_frame_rotation(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    try:
        for frame in container.decode(stream):
            return frame.rotation
    except av.FFmpegError:
        pass
    return 0


def _decode(
    container: av.container.InputContainer, stream: av.VideoStream, report: VideoReadReport
) -> Iterator[av.VideoFrame]:
    """Decoded frames in presentation order; undecodable packets are counted and skipped,
    a demuxing error (truncated file) ends the stream. Frame threading is left off: it
    drops the frames in flight when a truncated packet fails to decode."""
    try:
        for packet in container.demux(stream):
            try:
                yield from stream.decode(packet)
            except av.FFmpegError:
                report.decode_errors += 1
    except av.FFmpegError:
        report.decode_errors += 1
