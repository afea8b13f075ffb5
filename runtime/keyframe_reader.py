"""Decode frames by number, from the start or from a keyframe, skipping unwanted pictures.

A frame's number is its position in presentation order: the keyframe's frame number plus
how many packets since the keyframe are shown before it. Packets are demuxed
``LOOKAHEAD`` ahead of the decoder, more than any codec reorders (H.264 and HEVC at most
16 frames), so each packet's number is known before it is decoded; a non-reference
picture that is not wanted is then skipped by the decoder (``skip_frame = NONREF``):
nothing refers to it, so the wanted frames come out exactly as sequential decoding gives
them.

Whatever breaks these rules (a packet without a timestamp, a seek that lands elsewhere
than on a known keyframe, a packet shown before one already numbered, a decode error)
raises :class:`LostTrack`, and the caller decodes sequentially instead.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Collection, Iterator

import av

from loc3r.runtime.frame_index import FrameIndex, KeyFrame

LOOKAHEAD = 24


class LostTrack(Exception):
    """Frame numbers can no longer be guaranteed to match sequential decoding."""


class _Ranks:
    """Presentation numbers from timestamps: ``first`` + how many timestamps seen are smaller."""

    def __init__(self, first: int) -> None:
        self.first = first
        self._pending: list[int] = []  # sorted timestamps not yet folded into ``first``
        self._floor: int | None = None  # a frame with this timestamp has come out

    def add(self, pts: int) -> None:
        if self._floor is not None and pts < self._floor:
            raise LostTrack("a packet is shown before a frame that has already come out")
        insort(self._pending, pts)

    def number(self, pts: int) -> int:
        return self.first + bisect_left(self._pending, pts)

    def settle(self, pts: int) -> None:
        """The frame at ``pts`` came out: fold the timestamps below it into ``first``."""
        below = bisect_left(self._pending, pts)
        self.first += below
        del self._pending[:below]
        self._floor = pts


class KeyframeReader:
    """Iterates ``(number, frame)`` from the stream's start or, given ``keyframe``, from a
    seek to it. After a seek the first frame out must be the keyframe itself; an open
    GOP's leading pictures (shown before it, decoded without their references) are
    dropped. Frames not in ``wanted`` may be skipped; ``on_decoded`` counts frames out."""

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.VideoStream,
        index: FrameIndex,
        keyframe: KeyFrame | None,
        wanted: Collection[int],
        on_decoded: Callable[[], None],
    ) -> None:
        self.container, self.stream, self.index = container, stream, index
        self.keyframe, self.wanted, self.on_decoded = keyframe, wanted, on_decoded
        self._ranks: _Ranks | None = None if keyframe is not None else _Ranks(0)
        self._key_pts: int | None = None  # after a seek: the keyframe's timestamp, until it is out

    def __iter__(self) -> Iterator[tuple[int, av.VideoFrame]]:
        context = self.stream.codec_context
        if self.keyframe is not None:
            self.container.seek(self.keyframe.timestamp, stream=self.stream)  # flushes the decoder too
        ahead: deque[av.Packet] = deque()
        try:
            for packet in self.container.demux(self.stream):
                if packet.size:  # an empty packet marks the end: flushed below
                    self._admit(packet)
                    ahead.append(packet)
                if len(ahead) > LOOKAHEAD:
                    yield from self._decode(ahead.popleft())
            while ahead:
                yield from self._decode(ahead.popleft())
            yield from self._decode(None)
        except av.FFmpegError as exc:
            raise LostTrack(f"demux or decode error: {exc}") from exc
        finally:
            context.skip_frame = "DEFAULT"

    def _admit(self, packet: av.Packet) -> None:
        if packet.pts is None:
            raise LostTrack("a packet has no timestamp")
        if self._ranks is None:  # the first packet after the seek
            landed = self.index.keyframe_of(packet)
            if landed is None:
                raise LostTrack(f"the seek to frame {self.keyframe.index} did not land on a known keyframe")
            self._ranks, self._key_pts = _Ranks(landed.index), packet.pts
        self._ranks.add(packet.pts)

    def _decode(self, packet: av.Packet | None) -> Iterator[tuple[int, av.VideoFrame]]:
        ranks = self._ranks
        if ranks is None:
            return  # nothing was demuxed after the seek
        if packet is not None:
            wanted = ranks.number(packet.pts) in self.wanted
            self.stream.codec_context.skip_frame = "DEFAULT" if wanted else "NONREF"
        for frame in self.stream.decode(packet):
            self.on_decoded()
            if frame.pts is None:
                raise LostTrack("a decoded frame has no timestamp")
            if self._key_pts is not None:
                if frame.pts < self._key_pts:
                    continue  # a leading picture of an open GOP
                if frame.pts != self._key_pts:
                    raise LostTrack("the first frame after the seek is not the keyframe")
                self._key_pts = None
            number = ranks.number(frame.pts)
            ranks.settle(frame.pts)
            yield number, frame
