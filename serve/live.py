"""Live sources the operator declared (``--live NAME=SPEC``): frames read in a background
thread into a small buffer; the model's worker feeds them to the source's session."""

from __future__ import annotations

import logging
import queue
import threading
from urllib.parse import urlsplit, urlunsplit

from loc3r.errors import InternalError, Loc3rError
from loc3r.runtime.sources import live_frames
from loc3r.runtime.video import Frame

log = logging.getLogger(__name__)
BUFFER_FRAMES = 16


class LiveFeed:
    """Every ``stride``-th frame of ``spec``, at most ``max_frames``, until the source ends."""

    def __init__(self, name: str, spec: str, stride: int, max_frames: int) -> None:
        self.name, self.spec = name, spec
        self.error: Loc3rError | None = None
        self._frames: queue.Queue[Frame] = queue.Queue(BUFFER_FRAMES)
        self._ended = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._read, args=(stride, max_frames), name=f"loc3r-live-{name}", daemon=True
        )
        self._thread.start()

    @property
    def finished(self) -> bool:
        """The source ended (or failed) and every frame read was taken."""
        return self._ended.is_set() and self._frames.empty()

    def take(self) -> list[Frame]:
        """The frames read since the last call (never blocks)."""
        frames = []
        while True:
            try:
                frames.append(self._frames.get_nowait())
            except queue.Empty:
                return frames

    def stop(self) -> None:
        self._stop.set()

    def _read(self, stride: int, max_frames: int) -> None:
        try:
            for frame in live_frames(self.spec, stride, max_frames):
                while not self._stop.is_set():
                    try:
                        self._frames.put(frame, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except Loc3rError as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001 - clients of this source are told it failed; the log says why
            self.error = InternalError(f"live source {self.name} failed: {type(exc).__name__}: {exc}")
        finally:
            if self.error is not None:
                log.warning("live source %s failed: %s", self.name, str(self.error).replace(self.spec, redacted(self.spec)))
            self._ended.set()


def redacted(spec: str) -> str:
    """``spec`` without the password a camera URL may carry (``rtsp://user:***@host/...``)."""
    try:
        parts = urlsplit(spec)
    except ValueError:
        return spec
    if parts.password is None:
        return spec
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"))
