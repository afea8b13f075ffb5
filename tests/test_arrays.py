"""The session's array operations on numpy arrays (exported backends) and tensors (PyTorch)."""

from __future__ import annotations

import numpy as np
import torch

from loc3r.runtime.arrays import cat, like, stack, to_numpy


def test_numpy_stays_numpy() -> None:
    a, b = np.ones((2, 3), np.float32), np.zeros((1, 3), np.float32)
    out = cat([a, b])
    assert isinstance(out, np.ndarray) and out.shape == (3, 3) and out.dtype == np.float32
    assert isinstance(stack([a, a]), np.ndarray) and stack([a, a]).shape == (2, 2, 3)


def test_where_the_two_meet_numpy_becomes_the_tensor_side() -> None:
    """An exported encoder (numpy) feeding the PyTorch LLM (an export without an LLM)."""
    head = torch.full((2, 3), 2.0, dtype=torch.bfloat16)
    blocks = np.arange(6, dtype=np.float32).reshape(2, 3)
    joined = cat([head, like(blocks, head)])
    assert isinstance(joined, torch.Tensor) and joined.dtype == torch.bfloat16
    assert joined[2:].float().tolist() == blocks.tolist()
    assert isinstance(cat([blocks, torch.ones(1, 3)]), torch.Tensor)


def test_like_casts_to_the_reference_numpy_dtype_and_to_numpy_widens_16_bit_tensors() -> None:
    assert like(torch.ones(2, dtype=torch.float64), np.zeros(1, np.float32)).dtype == np.float32
    assert to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float32
    assert to_numpy(torch.ones(2, dtype=torch.int64)).dtype == np.int64
