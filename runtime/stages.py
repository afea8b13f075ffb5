"""One small interface per stage; each backend (torch, onnxruntime, tensorrt) implements them."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from loc3r.models.llm import PrefillResult


class CameraStage(Protocol):
    """CUT3R step + ``f_cam``: one frame in, one LLM-width camera embedding out."""

    def step(self, image: Tensor, state: Any | None) -> tuple[Tensor, Any]:
        """image (3, H, W) in [-1, 1]; state None on the first frame -> (width,), new state."""
        ...


class VisionStage(Protocol):
    """SigLIP tower + projector + pooling + row newlines."""

    def encode(self, pixels: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, tokens_per_frame, width)."""
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
