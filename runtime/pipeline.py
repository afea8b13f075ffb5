"""Video in, answer and pose out: the stages stitched together.

``Pipeline.open`` turns a video into a :class:`VideoSession`: frames are decoded and
resized for the encoders in a background thread (bounded queue), each frame's CUT3R step
runs as soon as it arrives (the state is recurrent; a whole-clip encoder such as VGGT runs
when the last frame has arrived), SigLIP runs on batches, and every finished frame block
is prefilled into the LLM's KV cache at once (on GPU targets on a worker thread, while the
encoders take the next frames: ``runtime/overlap.py``), so when the question comes only its
own tokens remain. Encoded videos are kept in an on-disk cache; questions on the video the
pipeline holds reuse its KV prefix.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from loc3r.errors import InputError, RandomWeightsWarning, one_question
from loc3r.export.manifest import Manifest
from loc3r.identity import FileIdentity, file_identity
from loc3r.models.bundle import Bundle, load_bundle
from loc3r.models.layout import video_end_tokens, vision_tokens_per_frame
from loc3r.models.prompt import build_video_prefix
from loc3r.models.tiny import loc3r_home, resolve_model
from loc3r.progress import ProgressBar
from loc3r.runtime.arrays import cat
from loc3r.runtime.confidence import Calibration, find_calibration
from loc3r.runtime.encoding_cache import CachedVideo, EncodingCache
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.prefetch import prefetched
from loc3r.runtime.preprocess import camera_pixels, siglip_pixels
from loc3r.runtime.result import Answer, ModelInfo
from loc3r.runtime.scene_store import DEFAULT_BUDGET_BYTES, KVLayout, Scene, SceneStore
from loc3r.runtime.session import VISION_BATCH, FrameBlocks, Stages, VideoSession
from loc3r.runtime.video import Frame, VideoDecoder, iter_frames

log = logging.getLogger(__name__)
if TYPE_CHECKING:
    from loc3r.models.precision import Precision

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ESTIMATED_DURATION_S = 3600.0  # timestamps of an hour-long video, when the duration is not known
PREFETCH_FRAMES = 4


class Pipeline:
    """Loc3R-VLM over one backend's stages."""

    def __init__(
        self,
        bundle: Bundle,
        stages: Stages,
        backend: str,
        cache: EncodingCache | None = None,
        artifacts: str | None = None,
        precision: Precision | ExportedPrecision | None = None,
        decoder: VideoDecoder = iter_frames,
        calibration: Calibration | None = None,
        scenes: SceneStore | None = None,
    ) -> None:
        """``artifacts`` identifies what computes the stages (an export's fingerprint; the
        bundle checksum for the torch backend): encoding-cache entries are keyed on it.
        ``precision``: what the stages compute in (default: the bundle's PyTorch precision).
        ``decoder`` opens and samples video files (default: PyAV, ``iter_frames``).
        ``calibration`` turns sigma into ``Pose.confidence`` (``loc3r.runtime.confidence``).
        ``scenes`` stores video prefixes' KV (keyed like the encoding cache, used only with it)."""
        self.bundle = bundle
        self.scenes = scenes if cache is not None else None
        self.artifacts = artifacts or bundle.checksum
        self.config = bundle.config
        self.stages = stages
        self.cache = cache
        self.decoder = decoder
        precision = precision or bundle.precision
        self.model_info = ModelInfo(
            model_id=bundle.config.model_id,
            checksum=bundle.checksum,
            random_weights=bundle.config.random_weights,
            localization=bundle.config.localization,
            backend=backend,
            encoder_3d=bundle.config.encoder_3d,
            dtype=precision.dtype_name,
            device=str(precision.device),
            dtype_reason=precision.reason,
            calibration=calibration,
        )
        self._session: VideoSession | None = None
        self._session_key: tuple[object, ...] | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "tiny",
        backend: str = "torch",
        engines: str | Path | None = None,
        cache_dir: str | Path | None = None,
        dtype: str = "auto",
        decoder: VideoDecoder = iter_frames,
        calibration: str | Path | None | Literal[False] = None,
        scene_budget_bytes: int = DEFAULT_BUDGET_BYTES,
        scene_compression: str = "none",
    ) -> Pipeline:
        """Open a bundle (``tiny``, ``tiny-vggt`` or a folder) and build the stages of ``backend``.

        ``onnxruntime`` and ``tensorrt`` run what ``loc3r-export`` wrote to ``engines``.
        ``cache_dir`` turns on the on-disk encoding cache (e.g. ``default_cache_dir()``).
        ``dtype`` is the PyTorch model's (``auto``: chosen for this machine, see
        ``loc3r.models.precision``). ``decoder`` opens and samples video files (default:
        PyAV, ``iter_frames``). ``calibration``: a calibration file, None for the bundle's own
        ``calibration.json`` when it has one, False for none; one fit for another bundle is refused.
        With the cache, video prefixes' KV are kept in its ``scenes`` folder under
        ``scene_budget_bytes`` (``scene_compression``: ``none`` or ``int8``).

        A model with random weights or untrained localization heads is announced with a
        :class:`~loc3r.errors.RandomWeightsWarning` (its answers and poses are meaningless).
        """
        scenes = SceneStore(Path(cache_dir) / "scenes", scene_budget_bytes, scene_compression) if cache_dir else None
        pipeline = cls._load(model, backend, engines, cache_dir, dtype, decoder, calibration, scenes)
        if pipeline.model_info.warning:
            warnings.warn(pipeline.model_info.warning, RandomWeightsWarning, stacklevel=2)
        return pipeline

    @classmethod
    def _load(
        cls, model: str | Path, backend: str, engines: str | Path | None, cache_dir: str | Path | None, dtype: str, decoder: VideoDecoder,
        calibration: str | Path | None | Literal[False] = None, scenes: SceneStore | None = None,
    ) -> Pipeline:
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        if backend != "torch" and engines is None:
            raise InputError(f"--backend {backend} needs --engines DIR", "pass the folder written by loc3r-export --out")
        bundle = load_bundle(resolve_model(model), dtype)
        calibrated = None if calibration is False else find_calibration(bundle.path, bundle.checksum, calibration)
        cache = EncodingCache(Path(cache_dir)) if cache_dir else None
        if backend == "torch":
            from loc3r.runtime.torch_backend import torch_stages

            return cls(bundle, Stages(*torch_stages(bundle)), backend, cache, decoder=decoder, calibration=calibrated, scenes=scenes)
        from loc3r.export.manifest import load_manifest

        manifest = load_manifest(engines)
        if backend == "onnxruntime":
            from loc3r.runtime.onnx_backend import onnx_stages

            stages = Stages(*onnx_stages(bundle, manifest))
            on_cpu = stages.vision.session.get_providers()[0] == "CPUExecutionProvider"
        else:
            from loc3r.runtime.tensorrt_backend import tensorrt_stages

            # the encoders on the TensorRT stream, the LLM on onnxruntime-gpu's: the video prefill overlaps the encoding
            stages, on_cpu = Stages(*tensorrt_stages(bundle, manifest), overlap_prefill=True), False
        precision = exported_precision(manifest, bundle, "cpu" if on_cpu else "cuda")
        return cls(bundle, stages, backend, cache, manifest.fingerprint, precision, decoder, calibrated, scenes)

    # -- sessions -------------------------------------------------------------------------

    def forget_video(self) -> None:
        """Drop the video the pipeline holds, so the next ``open`` starts afresh."""
        self._session = None
        self._session_key = None

    def new_session(self, source: str, with_bev: bool = False, live: bool = True) -> VideoSession:
        """An empty session (the LLM cache is given to it) for frames fed by the caller.

        ``live``: frames may keep coming after a question (a camera, a stream); a whole-clip
        3D encoder then encodes a sliding window (``runtime/camera_feed.py``).
        """
        self._session = VideoSession(self.bundle, self.stages, self.model_info, source, with_bev, live)
        self._session_key = None
        return self._session

    def open(
        self,
        video: str | Path,
        num_frames: int | None = None,
        with_bev: bool = False,
        streaming: bool = True,
        show_progress: bool = False,
        on_frame: Callable[[int, int], None] | None = None,
    ) -> VideoSession:
        """Sample ``num_frames`` of ``video``, encode them and prefill the video prefix.

        ``streaming=False`` is the reference order: decode every frame, then encode, then
        one prefill. Both give the same cache; streaming overlaps the work. ``on_frame(done,
        total)`` is called as each frame is encoded (streaming; not for a cached video).
        """
        num_frames = num_frames or self.config.num_frames
        identity = held_identity(video)
        key = (str(video), identity, num_frames, with_bev) if identity is not None else None
        if self._session is not None and key is not None and self._session_key == key:
            return self._session
        self.check_frames_fit(num_frames)
        session = self.new_session(str(video), with_bev, live=False)
        cache_key, cached = session.timer.measure("cache_read", self._read_cache, Path(video), num_frames)
        scene = session.timer.measure("cache_read", self._read_scene, cache_key, with_bev, cached) if cached else None
        session.store_key = cache_key
        if scene is not None:
            session.restore(cached.encoded, scene)
            session.report |= {"encoding_cache": "hit", "scene": "loaded"}
        elif cached is not None:
            session.add_blocks(cached.encoded)
            session.report["encoding_cache"] = "hit"
            session.finish(cached.duration_s)
        else:
            frames = self.decoder(video, num_frames)
            bar = ProgressBar(len(frames.indices), "encoding frames", show_progress)
            if streaming:  # decoding and resizing run ahead in a background thread
                for done, frame in enumerate(timed(prefetched(frames, PREFETCH_FRAMES, session.prepare), session.timer.add), start=1):
                    session.add_frame(frame)
                    bar.advance()
                    if on_frame is not None:
                        on_frame(done, len(frames.indices))
            else:
                decoded = list(timed(frames, session.timer.add))
                session.add_blocks(self.encode_frames(decoded, session))
            bar.close()
            session.report.update(read_report(frames))
            session.finish(frames.info.duration_s)
            unchanged = identity is not None and held_identity(video) == identity  # not rewritten while decoded
            if cache_key and unchanged and self.cache.store(cache_key, session.encoded, frames.info.duration_s):
                session.report["encoding_cache"] = "stored"
        kept = cached is not None or unchanged
        if kept and scene is None and cache_key and self.scenes is not None and self.cache.writable:
            stored = session.timer.measure("scene_store", lambda: self.scenes.store(cache_key, session.scene()))
            if stored is not None:
                session.report["scene"] = "stored"
        self._session_key = key if kept else None
        return session

    def check_frames_fit(
        self, num_frames: int, max_new_tokens: int = 0, question_tokens: int = 0, duration_s: float = ESTIMATED_DURATION_S
    ) -> None:
        """Refuse, before anything is decoded or encoded, a frame count whose video prefix
        (``num_frames`` x tokens per frame + the text around it, with the timestamps of a
        ``duration_s``-second video), the question and the answer do not fit the LLM's context;
        the message gives the largest frame count (or ``--max-new-tokens``) that does."""
        limit = self.stages.llm.context_limit
        other = question_tokens + max_new_tokens

        def video_tokens(frames: int) -> int:
            stamps = np.linspace(0.0, duration_s, frames).tolist()
            return build_video_prefix(
                self.bundle.tokenizer, frames, vision_tokens_per_frame(self.config), duration_s, stamps, video_end_tokens(self.config)
            ).length

        length = video_tokens(num_frames)
        if length + other <= limit:
            return
        low, high = 0, num_frames  # video_tokens grows with the frame count: bisect the largest that fits
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if video_tokens(middle) + other <= limit else (low, middle - 1)
        if low >= 1:
            extra = f", and the question and answer need {other} more" if other else ""
            raise InputError(
                f"{num_frames} frames x {1 + vision_tokens_per_frame(self.config)} tokens per frame make a {length}-token "
                f"video prompt{extra}, but the LLM's context limit is {limit} tokens",
                f"use at most {low} frames (--frames {low})" + (" or a lower --max-new-tokens" if max_new_tokens else ""),
            )
        if length + question_tokens > limit:
            raise InputError(
                f"the question is {question_tokens} tokens long, and with the {num_frames}-frame video prompt "
                f"({length} tokens) it exceeds the LLM's context limit of {limit} tokens",
                f"shorten the question to at most {max(limit - length, 0)} tokens, or use fewer frames (--frames)",
            )
        room = limit - length - question_tokens
        raise InputError(
            f"--max-new-tokens {max_new_tokens} does not fit: the {num_frames}-frame video prompt and the question "
            f"already take {length + question_tokens} of the LLM's context limit of {limit} tokens",
            f"use at most --max-new-tokens {room}" if room >= 1 else "use fewer frames (--frames) or a shorter question",
        )

    def encode_frames(self, frames: list[Frame], session: VideoSession) -> FrameBlocks:
        """Encode decoded frames without touching the LLM (the reference, whole-video order;
        the encoders take ``VISION_BATCH`` frames at a time, as when streaming)."""
        encoded = FrameBlocks()
        images = np.stack([session.timer.measure("preprocess", camera_pixels, frame, self.config) for frame in frames])
        cameras = session.timer.measure("encode_3d", self.stages.camera.encode, images)
        vision: list[object] = []
        for start in range(0, len(frames), VISION_BATCH):
            pixels = session.timer.measure("preprocess", siglip_pixels, frames[start : start + VISION_BATCH], self.config.vision.image_size)
            vision += session.timer.measure("encode_vision", self.stages.vision.encode, pixels)
        encoded.blocks = [cat([c[None], v]) for c, v in zip(cameras, vision, strict=True)]
        encoded.indices = [f.index for f in frames]
        encoded.timestamps_s = [f.timestamp_s for f in frames]
        return encoded

    def ask(
        self,
        video: str | Path,
        question: str,
        situation: str | None = None,
        sampling: SamplingConfig | None = None,
        num_frames: int | None = None,
        on_token: Callable[[int], None] | None = None,
        with_bev: bool = False,
    ) -> Answer:
        """Answer ``question`` about ``video`` (opened, or reused if it is the one held).

        Time to first token counts from this call: it includes opening the video, unless
        the pipeline already held it.
        """
        given_at = time.perf_counter()
        with one_question():  # a native panic while opening the video: this call's error, the pipeline stays usable
            session = self.open(video, num_frames, with_bev)
        return session.ask(question, situation, sampling, on_token, given_at)

    def _read_cache(self, video: Path, num_frames: int) -> tuple[str | None, CachedVideo | None]:
        """The encoding-cache key of ``video`` (None without a cache) and its entry, if any."""
        if self.cache is None or not video.is_file():
            return None, None
        key = self._cache_key(video, num_frames)
        block_shape = (1 + vision_tokens_per_frame(self.config), self.config.llm.hidden_size)
        return key, self.cache.load(key, block_shape)

    def _cache_key(self, video: Path, num_frames: int) -> str:
        return self.cache.key(
            video,
            model=self.bundle.checksum,
            backend=self.model_info.backend,
            artifacts=self.artifacts,
            dtype=self.model_info.dtype,
            frames=num_frames,
            cut3r_long_side=self.config.cut3r_long_side,
            vision_size=self.config.vision.image_size,
        )

    def _read_scene(self, key: str, with_bev: bool, cached: CachedVideo) -> Scene | None:
        """The stored scene of the video whose encoding-cache key is ``key`` and entry
        ``cached`` (None without one, or without its BEV points when they are asked for:
        then the prefix is recomputed)."""
        if self.scenes is None:
            return None
        scene = self.scenes.load(key, KVLayout(*self.stages.llm.kv_layout))
        if scene is not None and (scene.indices, scene.timestamps_s) != (cached.encoded.indices, cached.encoded.timestamps_s):
            log.warning("stored scene %s describes other frames than its encoding: discarded, recomputing", key)
            self.scenes.remove(key)
            return None
        return None if scene is None or (with_bev and scene.bev is None) else scene

    def scene_key(self, video: str | Path, num_frames: int | None = None) -> str | None:
        """The key ``video`` is (or would be) stored under, None without a cache."""
        return self._cache_key(Path(video), num_frames or self.config.num_frames) if self.cache is not None else None


@dataclass(frozen=True)
class ExportedPrecision:
    """What exported graphs compute in, where, and why (as ``Precision`` says it for PyTorch)."""

    dtype_name: str
    device: str
    reason: str


def exported_precision(manifest: Manifest, bundle: Bundle, device: str) -> ExportedPrecision:
    """The manifest's precision, and the LLM's form (an export without an LLM runs the
    bundle's in PyTorch)."""
    llm = manifest.data.get("llm")
    if llm:
        llm_part = f"LLM weights {llm['quantization']['layers']}"
    else:
        llm_part = f"LLM in PyTorch ({bundle.precision.dtype_name}: {bundle.precision.reason})"
    dtype = {"fp32": "float32", "fp16": "float16"}[manifest.precision]
    calibrated = any(isinstance(a.get("int8"), dict) and "calibration" in a["int8"] for a in manifest.artifacts.values())
    int8 = "calibrated QDQ, signed 8-bit from your frames" if calibrated else "unsigned 8-bit weights and activations"
    encoders = f"; encoders INT8 ({int8})" if manifest.encoders == "int8" else ""
    return ExportedPrecision(dtype, device, f"the export's precision ({manifest.precision}, manifest.json){encoders}; {llm_part}")


def held_identity(video: str | Path) -> FileIdentity | None:
    """The identity a held session of ``video`` is keyed on; None (never reused) when the
    video is not a readable regular file (the decoder then says what is wrong)."""
    try:
        return file_identity(video)
    except (OSError, InputError):
        return None


def default_cache_dir() -> Path:
    """``$LOC3R_HOME/cache/encodings``."""
    return loc3r_home() / "cache" / "encodings"


def timed(frames: Iterable[Frame], add: Callable[[str, float, float], None]) -> Iterable[Frame]:
    """Yield ``frames``, adding the time spent waiting for each to the ``decode`` stage."""
    iterator = iter(frames)
    while True:
        start = time.perf_counter()
        frame = next(iterator, None)
        add("decode", time.perf_counter() - start, start)
        if frame is None:
            return
        yield frame


def read_report(frames: object) -> dict[str, object]:
    """How many sampled frames were decodable, when fewer than asked."""
    report = getattr(frames, "report", None)
    if report is None or not report.missing:
        return {}
    return {"frames_requested": report.requested, "frames_decoded": report.yielded}
