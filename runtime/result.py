"""What one question returns: the answer, the pose read from ``<Pos>/<Ori>``, timings."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loc3r.runtime.confidence import DEFAULT_RADIUS_M, NO_CALIBRATION, Calibration, not_localized_reason

# Every key of ``Answer.timings`` (seconds unless stated). The video stages are those this
# question waited for: all of them for a question given with a video file, none for a
# follow-up on a prepared video; each is main-thread time, so they sum to at most video_s.
TIMINGS: dict[str, str] = {
    "cache_read": "video: hashing the file and reading its encoding-cache entry and stored scene (verified)",
    "scene_load": "video: copying the stored scene's KV into the LLM cache, instead of prefill_video",
    "scene_store": "video: writing the video prefix's KV to the scene store (the first open of a video)",
    "decode": "video: waiting for frames (decoding and resizing them run ahead in a background thread)",
    "preprocess": "video: resizing frames for the 3D encoder and SigLIP where the main thread does it (reference order, live input)",
    "encode_3d": "video: the 3D encoder + f_cam (CUT3R: one step per frame; VGGT: the whole clip, or a sliding window live)",
    "encode_vision": "video: SigLIP + projector + pooling + row newlines, every frame",
    "prefill_video": "video: LLM prefill of the video prefix (frame blocks, time instruction)",
    "video_s": "from the question being given to the video prefix being ready in the KV cache (0 when it was ready before)",
    "prefill_question": "LLM prefill of the question's own tokens over the cached video prefix",
    "question_to_first_token_s": "from the video prefix being ready (or the question, if later) to the first answer token",
    "ttft_s": "time to first token as the user waits for it: video_s + question_to_first_token_s",
    "decode_tokens_per_s": "generated tokens per second after the first (tokens/s; absent for one token)",
}


@dataclass(frozen=True)
class Pose:
    """Camera position on the BEV plane (metres), its uncertainty, and its heading.

    ``confidence``: P(position error <= 0.5 m / 1.0 m) from sigma by the bundle's calibration
    (``{"within_0.5m": p, "within_1.0m": p}``), None without one (``ModelInfo.confidence_note`` says why)."""

    x: float
    y: float
    sigma: float
    theta_rad: float
    confidence: dict[str, float] | None = None

    @property
    def theta_deg(self) -> float:
        return math.degrees(self.theta_rad)

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": {"x": self.x, "y": self.y, "sigma": self.sigma, "confidence": self.confidence},
            "orientation": {"theta_rad": self.theta_rad, "theta_deg": self.theta_deg},
        }


@dataclass(frozen=True)
class ModelInfo:
    """Which model answered and whether its outputs mean anything."""

    model_id: str
    checksum: str
    random_weights: bool
    localization: str
    backend: str
    encoder_3d: str = "cut3r"
    dtype: str = "float32"  # what the backend computed in
    device: str = "cpu"
    dtype_reason: str = ""  # why that dtype (chosen for the machine, --dtype, the export's precision)
    calibration: Calibration | None = field(default=None, compare=False)  # sigma -> confidence; None: no confidence

    @property
    def warning(self) -> str | None:
        """A sentence to show beside every output of an untrained or random model."""
        if self.random_weights:
            return f"model {self.model_id} has RANDOM weights: the answer and the pose are meaningless"
        if self.localization != "trained":
            return f"model {self.model_id} has untrained localization heads: the pose is meaningless"
        return None

    def confidence(self, sigma: float) -> dict[str, float] | None:
        """P(position error <= 0.5 m / 1.0 m) for ``sigma`` by the calibration (None without one)."""
        return self.calibration.confidence(sigma) if self.calibration else None

    @property
    def confidence_note(self) -> str:
        """What a pose's ``confidence`` means here, or why it is null."""
        return self.calibration.note if self.calibration else NO_CALIBRATION

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "checksum": self.checksum,
            "random_weights": self.random_weights,
            "localization": self.localization,
            "backend": self.backend,
            "encoder_3d": self.encoder_3d,
            "dtype": self.dtype,
            "device": self.device,
            "dtype_reason": self.dtype_reason,
            "calibration": self.calibration.summary() if self.calibration else None,
        }


def pose_record(pose: Pose, model: ModelInfo, not_localized: str | None = None, judged: bool = False) -> dict[str, Any]:
    """A pose's JSON fields: ``position``, ``orientation``, ``confidence_note``; when ``judged``
    against a minimum confidence, ``localized``, and below it (``not_localized``, the reason)
    ``position`` and ``orientation`` null with the pose under ``not_localized.pose``: a robot
    must not act on it."""
    out: dict[str, Any] = {**pose.to_dict(), "confidence_note": model.confidence_note}
    if judged:
        out["localized"] = not_localized is None
    if not_localized is not None:
        out |= {"position": None, "orientation": None, "not_localized": {"reason": not_localized, "pose": pose.to_dict()}}
    return out


@dataclass
class Answer:
    """One answered question."""

    question: str
    situation: str
    text: str
    token_ids: list[int]
    pose: Pose
    model: ModelInfo
    video: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)  # keys and meanings: TIMINGS
    bev_points: np.ndarray | None = None  # (frames, tokens, 2) metres, when asked for
    # set by ``require_confidence``: None when no minimum was asked for; else whether the pose met it
    localized: bool | None = None
    not_localized: str | None = None  # why not, when ``localized`` is False

    def require_confidence(self, min_confidence: float | None, radius_m: float = DEFAULT_RADIUS_M) -> Answer:
        """This answer judged against a minimum P(error <= ``radius_m``): ``localized`` False (and
        the pose withheld from ``to_dict``) below it. The caller checks that a calibration exists."""
        if min_confidence is None:
            return self
        reason = not_localized_reason(self.pose.confidence, min_confidence, radius_m)
        return dataclasses.replace(self, localized=reason is None, not_localized=reason)

    def __repr__(self) -> str:
        """The answer and the pose, with the model's warning when its outputs mean nothing."""
        warning = f", warning={self.model.warning!r}" if self.model.warning else ""
        localized = "" if self.localized is None else f", localized={self.localized}"
        return f"Answer(text={self.text!r}, pose={self.pose!r}{localized}, model={self.model.model_id!r}{warning})"

    def plot(self, path: str | Path) -> Path:
        """Write the top-down map of this answer as a PNG (see ``loc3r.runtime.plot``)."""
        from loc3r.runtime.plot import plot_bev

        return plot_bev(self, path)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "question": self.question,
            "situation": self.situation,
            "answer": self.text,
            "answer_token_ids": self.token_ids,
            **pose_record(self.pose, self.model, self.not_localized if self.localized is False else None, self.localized is not None),
            "timings": self.timings,
            "video": self.video,
            "model": self.model.to_dict(),
        }
        if self.model.warning:
            out["warning"] = self.model.warning
        return out
