"""One small interface per stage; each backend (torch, onnxruntime, tensorrt) implements them.

Stages take numpy arrays or tensors and hand out their own array type (see
``loc3r.runtime.arrays``): nothing here imports torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from loc3r.runtime.arrays import Array, stack

Tensor = Array  # numpy arrays from the exported backends, torch tensors from the PyTorch one


@dataclass
class PrefillResult:
    """What one prefill returns."""

    hidden_states: Array  # (n, width): final-norm hidden states, what lm_head reads
    last_logits: Array  # (vocab,): logits of the last position


# frames the image encoders take at once (the streaming batch): the TensorRT profiles of
# the batched graphs end here (``vision_frames`` in engines/*.toml)
FRAME_BATCH = 8


class CameraStage(Protocol):
    """3D encoder + ``f_cam``: LLM-width camera embeddings, one per frame of a clip.

    Every encoder encodes a whole clip; streaming ones (CUT3R) also step frame by frame
    (see ``StreamingCameraStage``); the others (VGGT) need the clip first.
    """

    def encode(self, images: Tensor) -> Tensor:
        """One clip (T, 3, H, W), preprocessed for the encoder, in order -> (T, width)."""
        ...


@runtime_checkable
class StreamingCameraStage(CameraStage, Protocol):
    """A recurrent encoder (CUT3R): its image encoder does not depend on the state, so frames
    are encoded in batches (``encode_frames``); the recurrent ``step`` then runs frame by
    frame, in order, and each frame's embedding is final after its step."""

    def encode_frames(self, images: Tensor) -> Sequence[Any]:
        """(N, 3, H, W), one size, N at most ``FRAME_BATCH`` -> one encoding per frame (the
        backend's own form, valid until the next call)."""
        ...

    def step(self, encoded: Any, state: Any | None) -> tuple[Tensor, Any]:
        """One frame's encoding; state None on the first frame -> (width,), new state."""
        ...


def step_through(stage: StreamingCameraStage, images: Sequence[Tensor], state: Any | None) -> tuple[list[Tensor], Any]:
    """Camera embeddings of ``images``, in order, from ``state``: the image encoder on runs
    of equal-size frames, ``FRAME_BATCH`` at a time, then the recurrent step frame by frame."""
    tokens = []
    for _, run in itertools.groupby(images, key=lambda image: tuple(image.shape)):
        frames = list(run)
        for start in range(0, len(frames), FRAME_BATCH):
            for encoded in stage.encode_frames(stack(frames[start : start + FRAME_BATCH])):
                token, state = stage.step(encoded, state)
                tokens.append(token)
    return tokens, state


class EncodeBySteps:
    """``encode`` for streaming stages: their steps over the clip from the first-frame state."""

    def encode(self: StreamingCameraStage, images: Tensor) -> Tensor:
        return stack(step_through(self, list(images), None)[0])


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

    @property
    def kv_layout(self) -> tuple[int, int, int, str]:
        """(arrays = 2 x layers, kv heads, head dim, KV dtype name)."""
        ...

    def read_kv(self) -> list[np.ndarray]:
        """The cache as host arrays, per layer key then value: (kv heads, length, head dim)."""
        ...

    def write_kv(self, arrays: list[np.ndarray]) -> None:
        """Replace the cache by arrays of :meth:`read_kv`'s form (float32 ones are cast)."""
        ...

    def prefill_branches(self, suffixes: list[Tensor]) -> list[Tensor]:
        """Hidden states of each suffix (n_i, width) prefilled on top of the cache, as if
        alone; the cache is left as it was."""
        ...
