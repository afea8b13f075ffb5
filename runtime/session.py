"""One video held in the LLM's KV cache, grown frame by frame, asked any number of questions.

The cache holds ``head`` (system turn + user header), then one block per frame as soon
as the frame is encoded (incremental prefill: a block needs its camera token, which a
whole-clip 3D encoder gives only at the end or per sliding window, see
``runtime/camera_feed.py``), then, once the video is complete, the time instruction. A
question appends its suffix, generates, and cuts the cache back, so the next question
pays only for its own tokens. For a live source the time instruction
is added when a question arrives and cut back with it, so frames can keep coming.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from loc3r.errors import InputError
from loc3r.models.bundle import Bundle
from loc3r.models.prompt import VideoPrefix, build_question_suffix, build_video_prefix
from loc3r.models.vision import pooled_side, pooled_token_offsets, video_end_tokens, vision_tokens_per_frame
from loc3r.runtime.generate import SamplingConfig, generate
from loc3r.runtime.camera_feed import camera_feed
from loc3r.runtime.preprocess import camera_input, siglip_input
from loc3r.runtime.result import Answer, ModelInfo, Pose
from loc3r.runtime.stages import FRAME_BATCH, CameraStage, HeadsStage, LLMStage, VisionStage
from loc3r.runtime.video import Frame

log = logging.getLogger(__name__)
VISION_BATCH = FRAME_BATCH  # SigLIP batches: the frames the 3D encoder takes at once


@dataclass
class Stages:
    """The four stages of one backend."""

    camera: CameraStage
    vision: VisionStage
    heads: HeadsStage
    llm: LLMStage


class StageTimer:
    """Accumulates wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def measure(self, stage: str, fn: Callable[..., object], *args: object) -> object:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.add(stage, time.perf_counter() - start)


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

    def __init__(
        self, bundle: Bundle, stages: Stages, model_info: ModelInfo, source: str, with_bev: bool = False, live: bool = True
    ) -> None:
        self.bundle, self.stages, self.model_info = bundle, stages, model_info
        self.config = bundle.config
        self.source = source
        self.with_bev = with_bev
        self.timer = StageTimer()
        self.encoded = FrameBlocks()
        self.duration_s: float | None = None  # set by finish(); None while frames may come
        self.report: dict[str, object] = {}
        self._camera = camera_feed(stages.camera, live, self.config.num_frames)
        self._unseen: list[Frame] = []  # frames waiting for a vision batch
        self._seen: list[tuple[int, float, Tensor]] = []  # (index, timestamp, vision tokens) waiting for a camera token
        self._cameras: list[Tensor] = []  # camera embeddings of the oldest frames not yet prefilled
        self._bev: list[np.ndarray] = []
        self._lock = threading.RLock()
        self._blocks_end = 0  # cache length after the last prefilled frame block
        self._tail_in_cache = False
        self._vision_tokens = vision_tokens_per_frame(self.config)
        stages.llm.reset()
        self._prefill("prefill_video", self._head_ids())
        self._blocks_end = stages.llm.cached_length

    # -- frames ---------------------------------------------------------------------------

    def add_frame(self, frame: Frame) -> None:
        """Encode one frame (3D encoder as its feed allows; SigLIP in batches) and prefill finished blocks."""
        with self._lock:
            if self.duration_s is not None:
                raise InputError("the video is already complete", "open a new session for more frames")
            self._drop_tail()
            image = camera_input(frame.rgb, self.config)
            self._cameras += self.timer.measure("encode_3d", self._camera.push, image)
            self._unseen.append(frame)
            if len(self._unseen) >= VISION_BATCH:
                self._encode_vision()
            self._prefill_ready()

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
            self._flush()
            if not self.encoded.blocks:
                raise InputError(f"{self.source}: no frames were received", "check the video source")
            self.duration_s = self._duration() if duration_s is None else duration_s
            self._ensure_tail()

    @property
    def num_frames(self) -> int:
        return len(self.encoded.blocks) + len(self._seen) + len(self._unseen)

    def _flush(self) -> None:
        """Encode every frame received so far and prefill their blocks."""
        if self._camera.pending:
            self._cameras += self.timer.measure("encode_3d", self._camera.flush)
        self._encode_vision()
        self._prefill_ready()

    def _encode_vision(self) -> None:
        if not self._unseen:
            return
        frames, self._unseen = self._unseen, []
        pixels = siglip_input([f.rgb for f in frames], self.config.vision.image_size)
        vision = self.timer.measure("encode_vision", self.stages.vision.encode, pixels)
        self._seen += [(f.index, f.timestamp_s, tokens) for f, tokens in zip(frames, vision, strict=True)]

    def _prefill_ready(self) -> None:
        """Prefill the oldest frames that have both their vision tokens and their camera embedding."""
        ready = min(len(self._seen), len(self._cameras))
        if not ready:
            return
        frames, cameras = self._seen[:ready], self._cameras[:ready]
        self._seen, self._cameras = self._seen[ready:], self._cameras[ready:]
        blocks = [torch.cat([camera[None], tokens]) for (_, _, tokens), camera in zip(frames, cameras, strict=True)]
        self._append_blocks(blocks, [index for index, _, _ in frames], [stamp for _, stamp, _ in frames])

    def _append_blocks(self, blocks: list[Tensor], indices: list[int], timestamps: list[float]) -> None:
        if not blocks:
            return
        self._check_length(self._blocks_end + len(blocks) * blocks[0].shape[0])
        for start, part, hidden in self._prefill_blocks(blocks):
            if self.with_bev:
                self._bev.append(self._bev_points(hidden, len(part)))
            self.encoded.blocks.extend(part)
            self.encoded.indices.extend(indices[start : start + len(part)])
            self.encoded.timestamps_s.extend(timestamps[start : start + len(part)])
            self._blocks_end = self.stages.llm.cached_length

    def _prefill_blocks(self, blocks: list[Tensor]) -> Iterator[tuple[int, list[Tensor], Tensor]]:
        """Prefill frame blocks as many whole frames at a time as fit in one LLM chunk (at
        least one), so that no more than one group's embeddings and hidden states are held at
        once, however many frames come (e.g. a whole cached video); yields (index of the
        group's first frame, its blocks, their hidden states)."""
        if not blocks:
            return
        group = max(1, self.stages.llm.chunk_tokens // blocks[0].shape[0])
        for start in range(0, len(blocks), group):
            part = blocks[start : start + group]
            yield start, part, self._prefill_embeds("prefill_video", torch.cat(part)).hidden_states

    # -- questions ------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        situation: str | None = None,
        sampling: SamplingConfig | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Answer:
        """Answer from the frames so far; the pose comes from ``<Pos>``/``<Ori>``."""
        sampling = sampling or SamplingConfig()
        tokenizer = self.bundle.tokenizer
        suffix = build_question_suffix(tokenizer, question, situation)
        with self._lock:
            asked_at = time.perf_counter()
            timings = dict(self.timer.seconds)
            self._flush()
            if not self.encoded.blocks:
                raise InputError(f"{self.source}: no frames have been encoded yet", "wait for frames, then ask")
            tail_start = time.perf_counter()
            live_tail = self._ensure_tail()
            timings["prefill_time_text"] = time.perf_counter() - tail_start
            prefix_length = self.stages.llm.cached_length
            self._check_length(prefix_length + len(suffix.ids), sampling.max_new_tokens)
            start = time.perf_counter()
            result = self.stages.llm.prefill(self.stages.llm.embed(suffix.ids))
            timings["prefill_question"] = time.perf_counter() - start
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
            finally:
                self.stages.llm.truncate(self._blocks_end if live_tail else prefix_length)
                if live_tail:
                    self._tail_in_cache = False
        if token_times:
            timings["ttft_s"] = token_times[0] - asked_at
            if len(token_times) > 1:
                timings["decode_tokens_per_s"] = (len(token_times) - 1) / (token_times[-1] - token_times[0])
        pose = Pose(float(xy[0]), float(xy[1]), float(sigma), float(theta))
        if not all(math.isfinite(v) for v in (pose.x, pose.y, pose.sigma, pose.theta_rad)):
            log.warning("the model gave a non-finite pose (JSON shows null): its weights or engines may be damaged")
        return Answer(
            question=question,
            situation=situation or "",
            text=tokenizer.decode(tokens),
            token_ids=tokens,
            pose=pose,
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
            self._prefill("prefill_video", self._head_ids())
            for _ in self._prefill_blocks(self.encoded.blocks):
                pass
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
            self.bundle.tokenizer, len(self.encoded.blocks), self._vision_tokens, self._duration(),
            self.encoded.timestamps_s, video_end_tokens(self.config),
        )

    def _duration(self) -> float:
        if self.duration_s is not None:
            return self.duration_s
        stamps = self.encoded.timestamps_s
        return stamps[-1] - stamps[0] if stamps else 0.0

    def _ensure_tail(self) -> bool:
        """Put the video-end tokens and the time instruction after the blocks; True if they
        must go again after the answer (frames may still come)."""
        if not self._tail_in_cache:
            prefix = self._prefix()
            self._check_length(self._blocks_end + prefix.end_tokens + len(prefix.tail_ids))
            video_end = self.stages.vision.video_end()
            tail = self.stages.llm.embed(prefix.tail_ids)
            self._prefill_embeds("prefill_video", torch.cat((video_end.to(tail.dtype), tail)))
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
        vision = hidden.reshape(frames, 1 + self._vision_tokens, -1)[:, 1:]
        vision = vision[:, pooled_token_offsets(side, config.newline_position)]
        points = self.stages.heads.bev(vision.reshape(-1, vision.shape[-1]))
        return points.reshape(frames, side * side, 2).float().cpu().numpy()

    def _check_length(self, length: int, max_new_tokens: int = 0) -> None:
        limit = self.stages.llm.context_limit
        if length > limit:
            raise InputError(
                f"the prompt needs {length} tokens but the LLM's context limit is {limit}",
                "use fewer frames (--frames) or a shorter question, or re-export with a larger --context-tokens",
            )
        if length + max_new_tokens > limit:
            raise InputError(
                f"the prompt needs {length} tokens and --max-new-tokens asks for {max_new_tokens} more, "
                f"but the LLM's context limit is {limit}",
                f"use at most --max-new-tokens {limit - length}, or fewer frames (--frames)",
            )
