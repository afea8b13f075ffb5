"""One video held in the LLM's KV cache, grown frame by frame, asked any number of questions.

The cache holds ``head`` (system turn + user header), then one block per frame as soon
as the frame is encoded (incremental prefill; the head goes in with the first blocks),
then, once the video is complete, the time instruction. A question appends its suffix,
generates, and cuts the cache back, so the next question pays only for its own tokens. For a live source the time instruction
is added when a question arrives and cut back with it, so frames can keep coming.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from loc3r.errors import InputError
from loc3r.models.bundle import Bundle
from loc3r.models.prompt import VideoPrefix, build_question_suffix, build_video_prefix
from loc3r.models.vision import pooled_side, vision_tokens_per_frame
from loc3r.runtime.generate import SamplingConfig, generate
from loc3r.runtime.preprocess import cut3r_input, siglip_input
from loc3r.runtime.result import Answer, ModelInfo, Pose
from loc3r.runtime.stages import CameraStage, HeadsStage, LLMStage, VisionStage
from loc3r.runtime.video import Frame

VISION_BATCH = 8


@dataclass
class Stages:
    """The four stages of one backend."""

    camera: CameraStage
    vision: VisionStage
    heads: HeadsStage
    llm: LLMStage


class StageTimer:
    """Wall-clock seconds per named stage, each measurement kept with its start time, so
    that a question can tell which video stages it waited for."""

    def __init__(self) -> None:
        self._spans: list[tuple[str, float, float]] = []  # (stage, start, seconds)
        self._lock = threading.Lock()

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per stage over every measurement."""
        return self.since(float("-inf"))

    def since(self, start: float) -> dict[str, float]:
        """Seconds per stage of the measurements that began at or after ``start``
        (``time.perf_counter()``)."""
        totals: dict[str, float] = {}
        with self._lock:
            for stage, began, seconds in self._spans:
                if began >= start:
                    totals[stage] = totals.get(stage, 0.0) + seconds
        return totals

    def add(self, stage: str, seconds: float, start: float | None = None) -> None:
        """Record ``seconds`` of ``stage`` that began at ``start`` (default: ``seconds`` ago)."""
        began = time.perf_counter() - seconds if start is None else start
        with self._lock:
            self._spans.append((stage, began, seconds))

    def measure(self, stage: str, fn: Callable[..., object], *args: object) -> object:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.add(stage, time.perf_counter() - start, start)


@dataclass(frozen=True)
class PreparedFrame:
    """A frame made ready for the encoders: where it came from, its CUT3R and SigLIP inputs."""

    index: int
    timestamp_s: float
    cut3r: Tensor  # (3, H, W) in [-1, 1]
    siglip: Tensor  # (3, S, S) in [-1, 1]


@dataclass
class FrameBlocks:
    """Encoded frames: ``[camera, vision...]`` at LLM width, with where they came from."""

    blocks: list[Tensor] = field(default_factory=list)  # each (1 + vision tokens, width)
    indices: list[int] = field(default_factory=list)
    timestamps_s: list[float] = field(default_factory=list)

    def stacked(self) -> Tensor:
        return torch.stack(self.blocks)


class VideoSession:
    """A video in the LLM cache; ``add_frame`` as frames arrive, ``ask`` at any time after."""

    def __init__(self, bundle: Bundle, stages: Stages, model_info: ModelInfo, source: str, with_bev: bool = False) -> None:
        self.bundle, self.stages, self.model_info = bundle, stages, model_info
        self.config = bundle.config
        self.source = source
        self.with_bev = with_bev
        self.timer = StageTimer()
        self.encoded = FrameBlocks()
        self.duration_s: float | None = None  # set by finish(); None while frames may come
        self.report: dict[str, object] = {}
        self._camera_state: object | None = None
        self._pending: list[tuple[PreparedFrame, Tensor]] = []  # frames waiting for a vision batch
        self._bev: list[np.ndarray] = []
        self._lock = threading.RLock()
        self._blocks_end = 0  # cache length after the last prefilled frame block (the head goes in with the first)
        self._tail_in_cache = False
        self._vision_tokens = vision_tokens_per_frame(self.config)
        stages.llm.reset()

    # -- frames ---------------------------------------------------------------------------

    def prepare(self, frame: Frame) -> PreparedFrame:
        """The encoders' inputs for ``frame``; safe to call from another thread (a decoder's)."""
        return PreparedFrame(
            frame.index,
            frame.timestamp_s,
            cut3r_input(frame, self.config.cut3r_long_side),
            siglip_input([frame], self.config.vision.image_size)[0],
        )

    def add_frame(self, frame: Frame | PreparedFrame) -> None:
        """Encode one frame (CUT3R now; SigLIP in batches) and prefill finished blocks."""
        with self._lock:
            if self.duration_s is not None:
                raise InputError("the video is already complete", "open a new session for more frames")
            self._drop_tail()
            if isinstance(frame, Frame):
                frame = self.timer.measure("preprocess", self.prepare, frame)
            camera, self._camera_state = self.timer.measure("encode_3d", self.stages.camera.step, frame.cut3r, self._camera_state)
            self._pending.append((frame, camera))
            if len(self._pending) >= VISION_BATCH:
                self._flush_vision()

    def add_blocks(self, encoded: FrameBlocks) -> None:
        """Prefill already-encoded frames (from the encoding cache) in one go."""
        with self._lock:
            self._drop_tail()
            self._append_blocks(encoded.blocks, encoded.indices, encoded.timestamps_s)

    def finish(self, duration_s: float | None = None) -> None:
        """No more frames: flush the last batch and prefill the time instruction now.

        ``duration_s`` defaults to the span of the frames' timestamps (live sources).
        """
        with self._lock:
            self._flush_vision()
            if not self.encoded.blocks:
                raise InputError(f"{self.source}: no frames were received", "check the video source")
            self.duration_s = self._duration() if duration_s is None else duration_s
            self._ensure_tail()

    @property
    def num_frames(self) -> int:
        return len(self.encoded.blocks) + len(self._pending)

    def _flush_vision(self) -> None:
        if not self._pending:
            return
        frames = [frame for frame, _ in self._pending]
        vision = self.timer.measure("encode_vision", self.stages.vision.encode, torch.stack([f.siglip for f in frames]))
        blocks = [torch.cat([camera[None], tokens]) for (_, camera), tokens in zip(self._pending, vision, strict=True)]
        self._pending = []
        self._append_blocks(blocks, [f.index for f in frames], [f.timestamp_s for f in frames])

    def _append_blocks(self, blocks: list[Tensor], indices: list[int], timestamps: list[float]) -> None:
        """Prefill frame blocks after those cached; the first ones go in with the head, in
        one causal pass over an empty cache (transformers' fast attention path)."""
        if not blocks:
            return
        embeds = torch.cat(blocks)
        if self._blocks_end == 0:
            embeds = torch.cat([self.stages.llm.embed(self._head_ids()), embeds])
        self._check_length(self._blocks_end + embeds.shape[0])
        hidden = self._prefill_embeds("prefill_video", embeds).hidden_states
        if self.with_bev:
            self._bev.append(self._bev_points(hidden[-len(blocks) * blocks[0].shape[0] :], len(blocks)))
        self.encoded.blocks.extend(blocks)
        self.encoded.indices.extend(indices)
        self.encoded.timestamps_s.extend(timestamps)
        self._blocks_end = self.stages.llm.cached_length

    # -- questions ------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        situation: str | None = None,
        sampling: SamplingConfig | None = None,
        on_token: Callable[[int], None] | None = None,
        given_at: float | None = None,
    ) -> Answer:
        """Answer from the frames so far; the pose comes from ``<Pos>``/``<Ori>``.

        ``given_at`` (a ``time.perf_counter()`` reading) is when the caller was given the
        question, when that was before the video was ready (a file opened for this
        question): time to first token then counts from it and includes the video stages
        run since. Without it, a question counts from this call (a follow-up, or a live
        session). See :data:`loc3r.runtime.result.TIMINGS` for every timing.
        """
        sampling = sampling or SamplingConfig()
        tokenizer = self.bundle.tokenizer
        suffix = build_question_suffix(tokenizer, question, situation)
        start = time.perf_counter() if given_at is None else given_at
        with self._lock:
            self._flush_vision()
            if not self.encoded.blocks:
                raise InputError(f"{self.source}: no frames have been encoded yet", "wait for frames, then ask")
            live_tail = self._ensure_tail()
            video_ready = time.perf_counter()
            prefix_length = self.stages.llm.cached_length
            self._check_length(prefix_length + len(suffix.ids) + sampling.max_new_tokens)
            result = self.stages.llm.prefill(self.stages.llm.embed(suffix.ids))
            prefill_question = time.perf_counter() - video_ready
            hidden = result.hidden_states
            xy, sigma, theta = self.stages.heads.pose(hidden[suffix.pos_offset], hidden[suffix.ori_offset])
            token_times: list[float] = []

            def record(token: int) -> None:
                token_times.append(time.perf_counter())
                if on_token is not None:
                    on_token(token)

            stop = {tokenizer.im_end_id, tokenizer.end_of_text_id}
            try:  # ``on_token`` may raise to stop early (a client gone): the cache is cut back all the same
                tokens = generate(result.last_logits, self.stages.llm.decode, stop, sampling, record)
                first_token = token_times[0] if token_times else time.perf_counter()  # a stop token first: generate returned at once
            finally:
                self.stages.llm.truncate(self._blocks_end if live_tail else prefix_length)
                if live_tail:
                    self._tail_in_cache = False
            timings = self.timer.since(start)  # the video stages this question waited for
        timings |= {
            "prefill_question": prefill_question,
            "video_s": video_ready - start,
            "question_to_first_token_s": first_token - video_ready,
            "ttft_s": first_token - start,
        }
        if len(token_times) > 1:
            timings["decode_tokens_per_s"] = (len(token_times) - 1) / (token_times[-1] - token_times[0])
        return Answer(
            question=question,
            situation=situation or "",
            text=tokenizer.decode(tokens),
            token_ids=tokens,
            pose=Pose(float(xy[0]), float(xy[1]), float(sigma), float(theta)),
            model=self.model_info,
            video=self.describe(),
            timings={k: round(v, 6) for k, v in timings.items()},
            bev_points=np.concatenate(self._bev) if self._bev else None,
        )

    def reclaim_cache(self) -> None:
        """Refill the LLM cache with this session's prefix after another session used it.

        Sessions of one pipeline share its LLM cache; the frames stay encoded in the
        session, so this costs one prefill of the video prefix and no decoding or encoding.
        """
        with self._lock:
            llm = self.stages.llm
            llm.reset()
            embeds = [llm.embed(self._head_ids()), *self.encoded.blocks]
            self._prefill_embeds("prefill_video", torch.cat(embeds))
            self._blocks_end = llm.cached_length
            self._tail_in_cache = False
            if self.duration_s is not None:
                self._ensure_tail()

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "frames": len(self.encoded.blocks),
            "indices": list(self.encoded.indices),
            "timestamps_s": [round(t, 3) for t in self.encoded.timestamps_s],
            "duration_s": self._duration(),
            **self.report,
        }

    # -- cache bookkeeping ----------------------------------------------------------------

    def _head_ids(self) -> tuple[int, ...]:
        return build_video_prefix(self.bundle.tokenizer, 0, self._vision_tokens, 0.0, []).head_ids

    def _prefix(self) -> VideoPrefix:
        return build_video_prefix(
            self.bundle.tokenizer, len(self.encoded.blocks), self._vision_tokens, self._duration(), self.encoded.timestamps_s
        )

    def _duration(self) -> float:
        if self.duration_s is not None:
            return self.duration_s
        stamps = self.encoded.timestamps_s
        return stamps[-1] - stamps[0] if stamps else 0.0

    def _ensure_tail(self) -> bool:
        """Put the time instruction after the blocks; True if it must go again after the answer."""
        if not self._tail_in_cache:
            prefix = self._prefix()
            self._check_length(self._blocks_end + len(prefix.tail_ids))
            self._prefill("prefill_video", prefix.tail_ids)
            self._tail_in_cache = True
        return self.duration_s is None

    def _drop_tail(self) -> None:
        if self._tail_in_cache:
            self.stages.llm.truncate(self._blocks_end)
            self._tail_in_cache = False

    def _prefill(self, stage: str, ids: tuple[int, ...]) -> None:
        self._prefill_embeds(stage, self.stages.llm.embed(ids))

    def _prefill_embeds(self, stage: str, embeds: Tensor):  # noqa: ANN202 - PrefillResult
        return self.timer.measure(stage, self.stages.llm.prefill, embeds)

    def _bev_points(self, hidden: Tensor, frames: int) -> np.ndarray:
        """BEV (x, y) of every vision token of ``frames`` blocks, newline tokens left out."""
        config = self.config
        side = pooled_side(config.vision.grid, config.spatial_pool_mode, config.spatial_pool_stride)
        per_row = side + int(config.newline_position == "grid")
        vision = hidden.reshape(frames, 1 + self._vision_tokens, -1)[:, 1:]
        vision = vision.reshape(frames, side, per_row, -1)[:, :, :side]
        points = self.stages.heads.bev(vision.reshape(-1, vision.shape[-1]))
        return points.reshape(frames, side * side, 2).float().numpy()

    def _check_length(self, length: int) -> None:
        limit = self.config.llm.max_position_embeddings
        if length > limit:
            raise InputError(
                f"the prompt needs {length} tokens but the LLM's context is {limit}",
                "use fewer frames (--frames) or a shorter question",
            )
