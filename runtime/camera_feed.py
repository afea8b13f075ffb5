"""Camera tokens for a session as frames arrive: stepped (CUT3R) or whole-clip (VGGT).

A feed takes preprocessed frames in order and hands back, in the same order, the camera
embeddings that have become final; the session pairs them with its oldest frames.

- A streaming stage encodes frames in batches of ``FRAME_BATCH`` (its image encoder), then
  steps each in order: an embedding is final once its batch is (or at ``flush``).
- A whole-clip stage on a bounded source (a file) encodes once, when the last frame has
  arrived (``flush``): exactly the reference's whole-clip encoding. (Flushed earlier, it
  encodes the frames so far, and later frames again with all of them as context.)
- A whole-clip stage on a live source cannot wait for an end. Every ``hop`` new frames (and
  at a question, for the frames still without one) it encodes a sliding window: the newest
  ``window`` frames, i.e. the new ones with up to ``window - hop`` earlier ones as context,
  and keeps the embeddings of the new ones. Embeddings already handed out never change, so
  the LLM's KV prefix stays valid. The trade-off: a frame sees the frames before it in its
  window and the ones encoded with it, never later ones; and once more than ``window`` frames
  have arrived, the window's first frame (VGGT's reference frame, with its own camera token)
  is no longer the stream's first. While the stream is within one window and no hop has
  passed, the result equals the whole-clip encoding of the frames so far.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from loc3r.runtime.arrays import Array as Tensor
from loc3r.runtime.arrays import stack
from loc3r.runtime.stages import FRAME_BATCH, CameraStage, StreamingCameraStage, step_through


class CameraFeed(Protocol):
    pending: int  # frames pushed that have no embedding yet

    def push(self, image: Tensor) -> list[Tensor]:
        """Add the next frame; the embeddings that became final, oldest first."""
        ...

    def flush(self) -> list[Tensor]:
        """Embeddings for every frame pushed and not yet answered, oldest first."""
        ...


class StepFeed:
    """A streaming stage: frames gathered into batches of ``FRAME_BATCH`` for its image
    encoder, then stepped in order, the state carried between them."""

    def __init__(self, stage: StreamingCameraStage) -> None:
        self.stage = stage
        self.state: Any | None = None
        self.frames: list[Tensor] = []

    @property
    def pending(self) -> int:
        return len(self.frames)

    def push(self, image: Tensor) -> list[Tensor]:
        self.frames.append(image)
        return self.flush() if len(self.frames) >= FRAME_BATCH else []

    def flush(self) -> list[Tensor]:
        frames, self.frames = self.frames, []
        tokens, self.state = step_through(self.stage, frames, self.state)
        return tokens


class ClipFeed:
    """A whole-clip stage: once at the end (bounded), or a sliding window (live)."""

    def __init__(self, stage: CameraStage, live: bool, window: int, hop: int | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.stage = stage
        self.live = live
        self.window = window
        self.hop = hop or max(window // 4, 1)
        if not 1 <= self.hop <= window:
            raise ValueError(f"hop must be within 1..{window}, got {self.hop}")
        self.frames: deque[Tensor] = deque(maxlen=window if live else None)
        self.pending = 0  # the newest frames without an embedding

    def push(self, image: Tensor) -> list[Tensor]:
        self.frames.append(image)
        self.pending += 1
        return self.flush() if self.live and self.pending >= self.hop else []

    def flush(self) -> list[Tensor]:
        if not self.pending:
            return []
        tokens = self.stage.encode(stack(list(self.frames)))
        new = list(tokens[len(tokens) - self.pending :])
        self.pending = 0
        return new


def camera_feed(stage: CameraStage, live: bool, window: int) -> CameraFeed:
    """The feed for ``stage``: stepped when it can step, else whole-clip (sliding window when live)."""
    if isinstance(stage, StreamingCameraStage):
        return StepFeed(stage)
    return ClipFeed(stage, live, window)
