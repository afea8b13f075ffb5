"""One small interface per stage; each backend (torch, onnxruntime, tensorrt) implements them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor

from loc3r.models.llm import PrefillResult


class CameraStage(Protocol):
    """CUT3R + ``f_cam``: frames encoded in batches (the ViT does not depend on the state),
    then one recurrent step per frame, in order, giving one LLM-width camera embedding."""

    def encode(self, images: Tensor) -> Sequence[Any]:
        """(N, 3, H, W) in [-1, 1], one size -> one encoding per frame (the backend's own form)."""
        ...

    def step(self, encoded: Any, state: Any | None) -> tuple[Tensor, Any]:
        """One frame's encoding; state None on the first frame -> (width,), new state."""
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
    """Prefill/decode over one KV cache that can be cut back to a prefix."""

    @property
    def cached_length(self) -> int: ...

    def embed(self, ids: list[int] | tuple[int, ...]) -> Tensor: ...

    def prefill(self, embeds: Tensor) -> PrefillResult: ...

    def decode(self, token_id: int) -> Tensor: ...

    def truncate(self, length: int) -> None: ...

    def reset(self) -> None: ...
