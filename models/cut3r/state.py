"""The recurrent state carried between CUT3R steps."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Cut3rState:
    """Batch-first recurrent state.

    ``state_feat``: (B, state_size, dec_embed_dim) state tokens after ``dec_norm_state``
    (before the first frame: the projected register tokens).
    ``memory``: (B, local_mem_size, 2 * dec_embed_dim) pose-retrieval memory.
    ``frame_index``: frames consumed so far; 0 selects the first-frame path (``pose_token``).
    """

    state_feat: Tensor
    memory: Tensor
    frame_index: int = 0
