"""One small interface per stage; each backend (torch, onnxruntime, tensorrt) implements them."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from loc3r.models.llm import PrefillResult


class CameraStage(Protocol):
    """3D encoder + ``f_cam``: LLM-width camera embeddings, one per frame of a clip.

    Every encoder encodes a whole clip; streaming ones (CUT3R) also ``step`` frame by frame
    (see ``StreamingCameraStage``); the others (VGGT) need the clip first.
    """

    def encode(self, images: Tensor) -> Tensor:
        """One clip (T, 3, H, W), preprocessed for the encoder, in order -> (T, width)."""
        ...


@runtime_checkable
class StreamingCameraStage(CameraStage, Protocol):
    """A recurrent encoder: each frame's embedding is final when the frame arrives."""

    def step(self, image: Tensor, state: Any | None) -> tuple[Tensor, Any]:
        """image (3, H, W); state None on the first frame -> (width,), new state."""
        ...


class EncodeBySteps:
    """``encode`` for streaming stages: ``step`` over the clip from the first-frame state."""

    def encode(self: StreamingCameraStage, images: Tensor) -> Tensor:
        state = None
        tokens = []
        for image in images:
            token, state = self.step(image, state)
            tokens.append(token)
        return torch.stack(tokens)


class VisionStage(Protocol):
    """SigLIP tower + projector + pooling + row newlines."""

    def encode(self, pixels: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, tokens_per_frame, width)."""
        ...

    def video_end(self) -> Tensor:
        """(k, width): the tokens after the last frame (k = 1 for one newline per video, else 0)."""
        ...


class HeadsStage(Protocol):
    """``f_pos`` / ``f_ori`` (with the soft-argmax) and ``f_bev``."""

    def pose(self, pos_state: Tensor, ori_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(width,), (width,) -> xy (2,), sigma (), theta ()."""
        ...

    def bev(self, vision_states: Tensor) -> Tensor:
        """(n, width) -> (n, 2)."""
        ...


class LLMStage(Protocol):
    """Prefill/decode over one KV cache that can be cut back to a prefix.

    ``prefill`` runs at most ``chunk_tokens`` positions per call of the model, so its
    transient memory is bounded; the cache never holds more than ``context_limit``.
    """

    chunk_tokens: int

    @property
    def cached_length(self) -> int: ...

    @property
    def context_limit(self) -> int: ...

    def embed(self, ids: list[int] | tuple[int, ...]) -> Tensor: ...

    def prefill(self, embeds: Tensor) -> PrefillResult: ...

    def decode(self, token_id: int) -> Tensor: ...

    def truncate(self, length: int) -> None: ...

    def reset(self) -> None: ...
