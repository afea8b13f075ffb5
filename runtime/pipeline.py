"""Video in, answer and pose out: the stages stitched together, with the video prefix cached.

Per frame, the CUT3R step runs as soon as the frame is decoded (its state is recurrent);
SigLIP runs on batches of decoded frames. The video prefix (system turn, frame blocks,
time instruction) is prefilled once per video and every question reuses its KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loc3r.errors import InputError
from loc3r.models.bundle import Bundle, load_bundle
from loc3r.models.prompt import (
    PromptLayout,
    VideoPrefix,
    build_question_suffix,
    build_video_prefix,
)
from loc3r.models.tiny import resolve_model
from loc3r.models.vision import pooled_side
from loc3r.runtime.generate import SamplingConfig, generate
from loc3r.runtime.preprocess import cut3r_input, siglip_input
from loc3r.runtime.result import Answer, ModelInfo, Pose
from loc3r.runtime.stages import CameraStage, HeadsStage, LLMStage, VisionStage
from loc3r.runtime.video import iter_frames

VISION_BATCH = 8
BACKENDS = ("torch", "onnxruntime", "tensorrt")


class StageTimer:
    """Accumulates wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def measure(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.add(stage, time.perf_counter() - start)


@dataclass
class VideoEncoding:
    """Every frame's block ``[camera, vision...]`` at LLM width, with the sampling facts."""

    source: str
    requested_frames: int
    frame_blocks: Tensor  # (frames, 1 + vision tokens, width)
    indices: list[int]
    timestamps_s: list[float]
    duration_s: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return self.frame_blocks.shape[0]

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "frames": self.num_frames,
            "indices": self.indices,
            "timestamps_s": [round(t, 3) for t in self.timestamps_s],
            "duration_s": self.duration_s,
        }


@dataclass
class CachedPrefix:
    """The video prefix the LLM's KV cache currently holds."""

    encoding: VideoEncoding
    prefix: VideoPrefix
    bev_points: np.ndarray | None


class Pipeline:
    """Loc3R-VLM over one set of stages; ``ask`` answers a question about a video."""

    def __init__(
        self,
        bundle: Bundle,
        camera: CameraStage,
        vision: VisionStage,
        heads: HeadsStage,
        llm: LLMStage,
        backend: str,
    ) -> None:
        self.bundle = bundle
        self.config = bundle.config
        self.camera, self.vision, self.heads, self.llm = camera, vision, heads, llm
        self.model_info = ModelInfo(
            model_id=bundle.config.model_id,
            checksum=bundle.checksum,
            random_weights=bundle.config.random_weights,
            localization=bundle.config.localization,
            backend=backend,
        )
        self._cached: CachedPrefix | None = None

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "tiny", backend: str = "torch", engines: str | Path | None = None
    ) -> Pipeline:
        """Open a bundle (``tiny`` or a folder) and build the stages of ``backend``.

        ``onnxruntime`` and ``tensorrt`` run the artifacts ``loc3r-export`` wrote to ``engines``.
        """
        bundle = load_bundle(resolve_model(model))
        if backend == "torch":
            from loc3r.runtime.torch_backend import torch_stages

            return cls(bundle, *torch_stages(bundle), backend=backend)
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        if engines is None:
            raise InputError(f"--backend {backend} needs --engines DIR", "pass the folder written by loc3r-export --out")
        from loc3r.export.manifest import load_manifest

        manifest = load_manifest(engines)
        if backend == "onnxruntime":
            from loc3r.runtime.onnx_backend import onnx_stages

            return cls(bundle, *onnx_stages(bundle, manifest), backend=backend)
        from loc3r.runtime.tensorrt_backend import tensorrt_stages

        return cls(bundle, *tensorrt_stages(bundle, manifest), backend=backend)

    # -- video ---------------------------------------------------------------------------

    def encode_video(self, video: str | Path, num_frames: int | None = None) -> VideoEncoding:
        """Decode the sampled frames and encode them as they arrive."""
        num_frames = num_frames or self.config.num_frames
        timer = StageTimer()
        frames = timer.measure("decode", iter_frames, video, num_frames)
        camera_embeds: list[Tensor] = []
        vision_blocks: list[Tensor] = []
        pending_rgb: list[np.ndarray] = []
        indices: list[int] = []
        timestamps: list[float] = []
        state = None
        while (frame := timer.measure("decode", next, frames, None)) is not None:
            indices.append(frame.index)
            timestamps.append(frame.timestamp_s)
            image = cut3r_input(frame.rgb, self.config.cut3r_long_side)
            camera_embed, state = timer.measure("encode_3d", self.camera.step, image, state)
            camera_embeds.append(camera_embed)
            pending_rgb.append(frame.rgb)
            if len(pending_rgb) == VISION_BATCH:
                vision_blocks.append(timer.measure("encode_vision", self._encode_vision, pending_rgb))
                pending_rgb = []
        if pending_rgb:
            vision_blocks.append(timer.measure("encode_vision", self._encode_vision, pending_rgb))
        vision_tokens = torch.cat(vision_blocks)
        blocks = torch.cat([torch.stack(camera_embeds).unsqueeze(1), vision_tokens], dim=1)
        return VideoEncoding(
            str(video), num_frames, blocks, indices, timestamps, frames.info.duration_s, timer.seconds
        )

    def _encode_vision(self, rgbs: list[np.ndarray]) -> Tensor:
        return self.vision.encode(siglip_input(rgbs, self.config.vision.image_size))

    # -- questions -----------------------------------------------------------------------

    def ask(
        self,
        video: str | Path | VideoEncoding,
        question: str,
        situation: str | None = None,
        sampling: SamplingConfig | None = None,
        num_frames: int | None = None,
        on_token: Callable[[int], None] | None = None,
        with_bev: bool = False,
    ) -> Answer:
        """Answer ``question`` about ``video``; the pose comes from ``<Pos>``/``<Ori>``."""
        sampling = sampling or SamplingConfig()
        tokenizer = self.bundle.tokenizer
        suffix = build_question_suffix(tokenizer, question, situation)
        encoding = video if isinstance(video, VideoEncoding) else self._encoding_for(video, num_frames)
        timings = dict(encoding.timings)
        cached = self._prefill_video(encoding, with_bev, timings)
        layout = PromptLayout(cached.prefix, suffix)
        self._check_context(layout, sampling)

        asked_at = time.perf_counter()
        result = self.llm.prefill(self.llm.embed(suffix.ids))
        timings["prefill_question"] = time.perf_counter() - asked_at
        xy, sigma, theta = self.heads.pose(result.hidden_states[suffix.pos_offset], result.hidden_states[suffix.ori_offset])
        pose = Pose(float(xy[0]), float(xy[1]), float(sigma), float(theta))

        token_times: list[float] = []

        def record(token: int) -> None:
            token_times.append(time.perf_counter())
            if on_token is not None:
                on_token(token)

        stop_ids = {tokenizer.im_end_id, tokenizer.end_of_text_id}
        tokens = generate(result.last_logits, self.llm.decode, stop_ids, sampling, record)
        if token_times:
            timings["ttft_s"] = token_times[0] - asked_at
            if len(token_times) > 1:
                timings["decode_tokens_per_s"] = (len(token_times) - 1) / (token_times[-1] - token_times[0])
        return Answer(
            question=question,
            situation=situation or "",
            text=tokenizer.decode(tokens),
            token_ids=tokens,
            pose=pose,
            model=self.model_info,
            video=encoding.describe(),
            timings={k: round(v, 6) for k, v in timings.items()},
            bev_points=cached.bev_points,
        )

    def _encoding_for(self, video: str | Path, num_frames: int | None) -> VideoEncoding:
        cached = self._cached
        wanted = num_frames or self.config.num_frames
        if cached and cached.encoding.source == str(video) and cached.encoding.requested_frames == wanted:
            return cached.encoding
        return self.encode_video(video, num_frames)

    def _prefill_video(self, encoding: VideoEncoding, with_bev: bool, timings: dict[str, float]) -> CachedPrefix:
        """Make the KV cache hold exactly ``encoding``'s prefix (reused when it already does)."""
        cached = self._cached
        if cached and cached.encoding is encoding and (cached.bev_points is not None or not with_bev):
            self.llm.truncate(cached.prefix.length)
            timings["prefill_video"] = 0.0
            return cached
        prefix = build_video_prefix(
            self.bundle.tokenizer,
            encoding.num_frames,
            encoding.frame_blocks.shape[1] - 1,
            encoding.duration_s,
            encoding.timestamps_s,
        )
        embeds = torch.cat(
            [
                self.llm.embed(prefix.head_ids),
                encoding.frame_blocks.reshape(-1, encoding.frame_blocks.shape[-1]),
                self.llm.embed(prefix.tail_ids),
            ]
        )
        self._check_length(prefix.length)
        start = time.perf_counter()
        self.llm.reset()
        result = self.llm.prefill(embeds)
        timings["prefill_video"] = time.perf_counter() - start
        bev = self._bev_points(result.hidden_states, prefix) if with_bev else None
        self._cached = CachedPrefix(encoding, prefix, bev)
        return self._cached

    def _bev_points(self, hidden: Tensor, prefix: VideoPrefix) -> np.ndarray:
        """BEV (x, y) of every vision token, newline tokens left out: (frames, h*w, 2)."""
        config = self.config
        side = pooled_side(config.vision.grid, config.spatial_pool_mode, config.spatial_pool_stride)
        per_row = side + int(config.newline_position == "grid")
        blocks = hidden[prefix.video_start : prefix.video_end].reshape(prefix.num_frames, prefix.tokens_per_frame, -1)
        vision = blocks[:, 1:].reshape(prefix.num_frames, side, per_row, -1)[:, :, :side]
        points = self.heads.bev(vision.reshape(-1, vision.shape[-1]))
        return points.reshape(prefix.num_frames, side * side, 2).float().numpy()

    def _check_length(self, length: int) -> None:
        limit = self.config.llm.max_position_embeddings
        if length > limit:
            raise InputError(
                f"the prompt needs {length} tokens but the LLM's context is {limit}",
                "use fewer frames (--frames) or a shorter question",
            )

    def _check_context(self, layout: PromptLayout, sampling: SamplingConfig) -> None:
        self._check_length(layout.length + sampling.max_new_tokens)
