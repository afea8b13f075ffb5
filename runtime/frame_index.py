"""Where a video stream's keyframes are, and a decoding plan that seeks to them.

Sampling 32 frames out of a long video should not decode all of it. The container's
index (mp4/mov/avi: every sample, read with the header) or one pass over the packets
(mkv/webm, no decoding) gives the frame count and the keyframes; :func:`plan_reads`
then decides, for each sampled frame, whether to carry on decoding from where the
decoder is or to seek to the keyframe before it, whichever decodes fewer frames. Dense
sampling (a short clip) never seeks; sparse sampling (minutes of video) seeks past
whole groups of pictures.

A keyframe's position in presentation order equals its position in decoding order for
closed groups of pictures; the reader checks that where it lands (see
``loc3r.runtime.video``) and decodes sequentially when it does not hold.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import av

# What one seek costs, in decoded frames: flushing the decoder, repositioning the demuxer
# and restarting from an intra frame. A seek pays off when it skips more frames than this.
SEEK_COST_FRAMES = 12


@dataclass(frozen=True)
class KeyFrame:
    """A random-access point: its frame number (decoding order), where a seek should aim
    (its presentation time, stream time base) and how to recognise its packet (byte
    position, else decode timestamp)."""

    index: int
    timestamp: int
    dts: int | None
    pos: int


@dataclass(frozen=True)
class FrameIndex:
    """Frame count of a stream and its keyframes (ascending ``index``)."""

    total_frames: int
    keyframes: tuple[KeyFrame, ...]
    complete: bool  # False: the packets could not all be read (truncated, or an entry without a timestamp)

    @cached_property
    def _numbers(self) -> list[int]:
        return [k.index for k in self.keyframes]

    def keyframe_at_or_before(self, frame: int) -> KeyFrame | None:
        position = bisect_right(self._numbers, frame)
        return self.keyframes[position - 1] if position else None

    def keyframe_of(self, packet: av.Packet) -> KeyFrame | None:
        """The keyframe ``packet`` is (the first packet after a seek), or None."""
        if not packet.is_keyframe:
            return None
        by_pos = next((k for k in self.keyframes if k.pos == packet.pos and k.pos >= 0), None)
        if by_pos is not None or packet.dts is None:
            return by_pos
        return next((k for k in self.keyframes if k.dts == packet.dts), None)  # avi's index points at chunk headers


def index_from_entries(stream: av.VideoStream) -> FrameIndex | None:
    """The index the container header gave (mp4/mov/avi list every frame), or None when it
    does not list every frame (mkv/webm Cues, fragmented mp4) or marks some as discarded."""
    entries = stream.index_entries
    if stream.frames <= 0 or len(entries) != stream.frames or any(e.is_discard for e in entries):
        return None
    # Index entries carry decode timestamps; seeks take presentation time (mov shifts by the
    # B-frame delay its edit list removes): aim at dts + that shift, or a seek lands a GOP early.
    shift = max(0, stream.start_time - entries[0].timestamp) if stream.start_time is not None else 0
    keyframes = tuple(KeyFrame(i, e.timestamp + shift, e.timestamp, e.pos) for i, e in enumerate(entries) if e.is_keyframe)
    return FrameIndex(stream.frames, keyframes, complete=True)


def scan_packets(container: av.container.InputContainer, stream: av.VideoStream) -> FrameIndex:
    """Count the frames of ``stream`` and find its keyframes by demuxing every packet."""
    total, keyframes, complete = 0, [], True
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the end-of-stream flush packet
            if packet.is_discard:
                complete = False  # edit-list pre-roll: decoded but not shown; keep it simple
            if packet.is_keyframe:
                aim = packet.pts if packet.pts is not None else packet.dts  # seeks take presentation time
                if aim is not None and (packet.dts is not None or packet.pos >= 0):
                    keyframes.append(KeyFrame(total, aim, packet.dts, packet.pos))
                else:
                    complete = False
            total += 1
    except av.FFmpegError:
        complete = False  # truncated: count what is there
    return FrameIndex(total, tuple(keyframes), complete)


@dataclass(frozen=True)
class Read:
    """Decode up to frame ``target``, first seeking to ``seek_to`` when it is not None."""

    target: int
    seek_to: KeyFrame | None


def plan_reads(index: FrameIndex, targets: Sequence[int], seek_cost: int = SEEK_COST_FRAMES) -> list[Read]:
    """One :class:`Read` per distinct target (ascending): seek to the keyframe at or before
    the target when decoding from it (plus ``seek_cost``) is cheaper than carrying on from
    the frame after the previous target."""
    reads, position = [], 0  # position: the next frame the decoder would give without a seek
    for target in sorted(set(targets)):
        keyframe = index.keyframe_at_or_before(target)
        seek = keyframe is not None and keyframe.index > position and (target - keyframe.index) + seek_cost < target - position
        reads.append(Read(target, keyframe if seek else None))
        position = target + 1
    return reads
