"""One video held in the LLM's KV cache, grown frame by frame, asked any number of questions.

The cache holds ``head`` (system turn + user header), then one block per frame as soon
as the frame is encoded (incremental prefill, the head going in with the first blocks: a
block needs its camera token, which a whole-clip 3D encoder gives only at the end or per
sliding window, see ``runtime/camera_feed.py``), then, once the video is complete, the
time instruction. A question appends its suffix, generates, and cuts the cache back, so
the next question pays only for its own tokens. For a live source the time instruction
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

from loc3r.errors import InputError, one_question
from loc3r.models.bundle import Bundle
from loc3r.models.layout import pooled_side, pooled_token_offsets, video_end_tokens, vision_tokens_per_frame
from loc3r.models.prompt import VideoPrefix, build_question_suffix, build_situation_suffix, build_video_prefix, check_text_fits
from loc3r.runtime.arrays import Array as Tensor
from loc3r.runtime.arrays import cat, like, stack, to_numpy
from loc3r.runtime.camera_feed import camera_feed
from loc3r.runtime.generate import SamplingConfig, generate
from loc3r.runtime.overlap import OrderedWorker
from loc3r.runtime.preprocess import camera_pixels, siglip_pixels
from loc3r.runtime.result import Answer, ModelInfo, Pose
from loc3r.runtime.scene_store import Scene
from loc3r.runtime.stages import FRAME_BATCH, CameraStage, HeadsStage, LLMStage, VisionStage
from loc3r.runtime.video import Frame

log = logging.getLogger(__name__)
VISION_BATCH = FRAME_BATCH  # SigLIP batches: the frames the 3D encoder takes at once


@dataclass
class Stages:
    """The four stages of one backend. ``overlap_prefill``: finished frame blocks are
    prefilled on a worker thread while the encoders take the next frames (GPU targets, whose
    encoders and LLM run on separate streams, ``runtime/overlap.py``); else in line."""

    camera: CameraStage
    vision: VisionStage
    heads: HeadsStage
    llm: LLMStage
    overlap_prefill: bool = False


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
    """A frame made ready for the encoders: where it came from, its 3D-encoder and SigLIP inputs."""

    index: int
    timestamp_s: float
    camera: np.ndarray  # the bundle's 3D-encoder input (``camera_pixels``)
    siglip: np.ndarray  # (3, S, S) in [-1, 1]


@dataclass
class FrameBlocks:
    """Encoded frames: ``[camera, vision...]`` at LLM width, with where they came from."""

    blocks: list[Tensor] = field(default_factory=list)  # each (1 + vision tokens, width)
    indices: list[int] = field(default_factory=list)
    timestamps_s: list[float] = field(default_factory=list)

    def stacked(self) -> Tensor:
        return stack(self.blocks)


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
        self.store_key: str | None = None  # where the scene store keeps this video's KV (a file in the encoding cache)
        self._camera = camera_feed(stages.camera, live, self.config.num_frames)
        self._unseen: list[PreparedFrame] = []  # frames waiting for a vision batch
        self._seen: list[tuple[int, float, Tensor]] = []  # (index, timestamp, vision tokens) waiting for a camera token
        self._cameras: list[Tensor] = []  # camera embeddings of the oldest frames not yet prefilled
        self._bev: list[np.ndarray] = []
        self._lock = threading.RLock()
        self._blocks_end = 0  # cache length after the last prefilled frame block (the head goes in with the first)
        self._tail_in_cache = False
        self._vision_tokens = vision_tokens_per_frame(self.config)
        self._prefiller = OrderedWorker(self._prefill_job) if stages.overlap_prefill else None
        self._handed_over = 0  # frames given to the prefill worker (in flight or done)
        stages.llm.reset()

    # -- frames ---------------------------------------------------------------------------

    def prepare(self, frame: Frame) -> PreparedFrame:
        """The encoders' inputs for ``frame``; safe to call from another thread (a decoder's)."""
        return PreparedFrame(
            frame.index,
            frame.timestamp_s,
            camera_pixels(frame, self.config),
            siglip_pixels([frame], self.config.vision.image_size)[0],
        )

    def add_frame(self, frame: Frame | PreparedFrame) -> None:
        """Encode one frame (3D encoder as its feed allows; SigLIP in batches) and prefill finished blocks."""
        with self._lock:
            if self.duration_s is not None:
                raise InputError("the video is already complete", "open a new session for more frames")
            self._drop_tail()
            if isinstance(frame, Frame):
                frame = self.timer.measure("preprocess", self.prepare, frame)
            self._cameras += self.timer.measure("encode_3d", self._camera.push, frame.camera)
            self._unseen.append(frame)
            if len(self._unseen) >= VISION_BATCH:
                self._encode_vision()
            self._prefill_ready()

    def add_blocks(self, encoded: FrameBlocks) -> None:
        """Prefill already-encoded frames (from the encoding cache) in one go."""
        with self._lock:
            self._drain()
            self._drop_tail()
            self._append_blocks(encoded.blocks, encoded.indices, encoded.timestamps_s)

    def restore(self, encoded: FrameBlocks, scene: Scene) -> None:
        """Take a stored scene's KV as the cache (no prefill) for a complete video whose
        encoded frames are ``encoded`` (the scene describes the same frames)."""
        with self._lock:
            self._drain()
            self.timer.measure("scene_load", self.stages.llm.write_kv, scene.kv)
            self.encoded = FrameBlocks(list(encoded.blocks), list(encoded.indices), list(encoded.timestamps_s))
            self._blocks_end, self._tail_in_cache, self.duration_s = scene.blocks_end, True, scene.duration_s
            self._bev = [] if scene.bev is None else [scene.bev]

    def scene(self) -> Scene:
        """This complete video's prefix KV (a host copy) and what describes it."""
        with self._lock:
            if self.duration_s is None:
                raise ValueError("only a complete video is a scene")
            self._ensure_tail()
            return Scene(
                self.stages.llm.read_kv(), self.stages.llm.kv_layout[3], self._blocks_end, list(self.encoded.indices),
                list(self.encoded.timestamps_s), self.duration_s, np.concatenate(self._bev) if self._bev else None,
            )

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
        with self._lock:
            prefilled = self._handed_over if self._prefiller is not None else len(self.encoded.blocks)
            return prefilled + len(self._seen) + len(self._unseen)

    def _flush(self) -> None:
        """Encode every frame received so far and prefill their blocks (waiting for the
        prefill worker, whose error, if any, is raised here)."""
        if self._camera.pending:
            self._cameras += self.timer.measure("encode_3d", self._camera.flush)
        self._encode_vision()
        self._prefill_ready()
        self._drain()

    def _drain(self) -> None:
        """Wait for the blocks handed to the prefill worker (none without one)."""
        if self._prefiller is not None:
            self._prefiller.drain()

    def _encode_vision(self) -> None:
        if not self._unseen:
            return
        frames, self._unseen = self._unseen, []
        vision = self.timer.measure("encode_vision", self.stages.vision.encode, np.stack([f.siglip for f in frames]))
        self._seen += [(f.index, f.timestamp_s, tokens) for f, tokens in zip(frames, vision, strict=True)]

    def _prefill_ready(self) -> None:
        """Prefill the oldest frames that have both their vision tokens and their camera embedding."""
        ready = min(len(self._seen), len(self._cameras))
        if not ready:
            return
        frames, cameras = self._seen[:ready], self._cameras[:ready]
        self._seen, self._cameras = self._seen[ready:], self._cameras[ready:]
        blocks = [cat([camera[None], tokens]) for (_, _, tokens), camera in zip(frames, cameras, strict=True)]
        job = (blocks, [index for index, _, _ in frames], [stamp for _, stamp, _ in frames])
        if self._prefiller is None:
            self._append_blocks(*job)
            return
        self._prefiller.submit(job)  # a previous block's prefill error is raised here
        self._handed_over += len(blocks)

    def _prefill_job(self, job: tuple[list[Tensor], list[int], list[float]]) -> None:
        """The prefill worker's job: the blocks of one batch of frames, after the earlier ones."""
        self._append_blocks(*job)

    def _append_blocks(self, blocks: list[Tensor], indices: list[int], timestamps: list[float]) -> None:
        if not blocks:
            return
        head = len(self._head_ids()) if self.stages.llm.cached_length == 0 else 0
        self._check_length(self._blocks_end + head + len(blocks) * blocks[0].shape[0])
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
        group's first frame, its blocks, their hidden states). Into an empty cache the head
        goes in with the first group, in one causal pass (transformers' fast attention path)."""
        if not blocks:
            return
        block_tokens = blocks[0].shape[0]
        group = max(1, self.stages.llm.chunk_tokens // block_tokens)
        for start in range(0, len(blocks), group):
            part = blocks[start : start + group]
            embeds = cat(part)
            if self.stages.llm.cached_length == 0:
                head = self.stages.llm.embed(self._head_ids())
                embeds = cat((head, like(embeds, head)))
            hidden = self._prefill_embeds("prefill_video", embeds).hidden_states
            yield start, part, hidden[-len(part) * block_tokens :]

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
        with one_question():  # a native panic (a tokenizer's) is this question's error; the session stays usable
            return self._ask(question, situation, sampling or SamplingConfig(), on_token, given_at)

    def _ask(
        self, question: str, situation: str | None, sampling: SamplingConfig, on_token: Callable[[int], None] | None, given_at: float | None
    ) -> Answer:
        tokenizer = self.bundle.tokenizer
        check_text_fits(tokenizer, question, self.stages.llm.context_limit)
        check_text_fits(tokenizer, situation or "", self.stages.llm.context_limit, "situation")
        suffix = build_question_suffix(tokenizer, question, situation)
        start = time.perf_counter() if given_at is None else given_at
        with self._lock:
            self._flush()
            if not self.encoded.blocks:
                raise InputError(f"{self.source}: no frames have been encoded yet", "wait for frames, then ask")
            live_tail = self._ensure_tail()
            video_ready = time.perf_counter()
            prefix_length = self.stages.llm.cached_length
            self._check_length(prefix_length + len(suffix.ids), sampling.max_new_tokens)
            token_times: list[float] = []

            def record(token: int) -> None:
                token_times.append(time.perf_counter())
                if on_token is not None:
                    on_token(token)

            stop = {tokenizer.im_end_id, tokenizer.end_of_text_id}
            # whatever fails from the question's prefill on (or ``on_token`` raising to stop early:
            # a client gone), the cache is cut back to the video, so the next question finds it whole
            try:
                result = self.stages.llm.prefill(self.stages.llm.embed(suffix.ids))
                prefill_question = time.perf_counter() - video_ready
                hidden = result.hidden_states
                xy, sigma, theta = self.stages.heads.pose(hidden[suffix.pos_offset], hidden[suffix.ori_offset])
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
        pose = Pose(float(xy[0]), float(xy[1]), float(sigma), float(theta), self.model_info.confidence(float(sigma)))
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

    def locate(self, situations: list[str]) -> list[Pose]:
        """The pose of each situation, no answer: each suffix up to ``<Pos><Ori>`` is
        prefilled on top of the video prefix (packed into one forward pass where the LLM
        allows, see ``LLMStage.prefill_branches``), the heads read, the cache cut back."""
        tokenizer = self.bundle.tokenizer
        suffixes = [build_situation_suffix(tokenizer, situation) for situation in situations]
        with self._lock:
            self._flush()
            if not self.encoded.blocks:
                raise InputError(f"{self.source}: no frames have been encoded yet", "wait for frames, then ask")
            live_tail = self._ensure_tail()
            try:
                self._check_length(self.stages.llm.cached_length + max((len(s.ids) for s in suffixes), default=0))
                embeds = [self.stages.llm.embed(s.ids) for s in suffixes]
                hidden = self.timer.measure("locate", self.stages.llm.prefill_branches, embeds)
            finally:
                if live_tail:
                    self.stages.llm.truncate(self._blocks_end)
                    self._tail_in_cache = False
        poses = []
        for suffix, states in zip(suffixes, hidden, strict=True):
            xy, sigma, theta = self.stages.heads.pose(states[suffix.pos_offset], states[suffix.ori_offset])
            poses.append(Pose(float(xy[0]), float(xy[1]), float(sigma), float(theta), self.model_info.confidence(float(sigma))))
        return poses

    def reclaim_cache(self, scene: Scene | None = None) -> None:
        """Refill the LLM cache with this session's prefix after another session used it.

        Sessions of one pipeline share its LLM cache: with ``scene`` (this video's, held in
        memory or loaded from the scene store) the refill is a copy; without, one prefill of
        the video prefix from the encoded frames (no decoding or encoding).
        """
        with self._lock:
            self._drain()
            llm = self.stages.llm
            if scene is not None:
                llm.write_kv(scene.kv)
                self._blocks_end, self._tail_in_cache = scene.blocks_end, True
                return
            llm.reset()
            for _ in self._prefill_blocks(self.encoded.blocks):  # the head goes in with the first group
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
            self._prefill_embeds("prefill_video", cat((like(video_end, tail), tail)))
            self._tail_in_cache = True
        return self.duration_s is None

    def _drop_tail(self) -> None:
        if self._tail_in_cache:
            self.stages.llm.truncate(self._blocks_end)
            self._tail_in_cache = False

    def _prefill_embeds(self, stage: str, embeds: Tensor):  # noqa: ANN202 - PrefillResult
        return self.timer.measure(stage, self.stages.llm.prefill, embeds)

    def _bev_points(self, hidden: Tensor, frames: int) -> np.ndarray:
        """BEV (x, y) of every vision token of ``frames`` blocks, newline tokens left out."""
        config = self.config
        side = pooled_side(config.vision.grid, config.spatial_pool_mode, config.spatial_pool_stride)
        vision = hidden.reshape(frames, 1 + self._vision_tokens, -1)[:, 1:]
        vision = vision[:, pooled_token_offsets(side, config.newline_position)]
        points = self.stages.heads.bev(vision.reshape(-1, vision.shape[-1]))
        return to_numpy(points).reshape(frames, side * side, 2).astype(np.float32)

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
