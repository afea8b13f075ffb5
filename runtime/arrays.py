"""The few array operations the session needs, on whichever array type a backend hands out.

Exported-graph backends (ONNX Runtime, TensorRT) give numpy arrays; the PyTorch backend
gives torch tensors. Both pass through the session unchanged, so the exported paths never
import torch; where the two meet (an exported encoder feeding the PyTorch LLM), the numpy
side is converted to the tensor's type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Array = Any  # numpy.ndarray or torch.Tensor


def _is_numpy(values: Sequence[Array]) -> bool:
    return all(isinstance(v, np.ndarray) for v in values)


def _as_tensors(values: Sequence[Array]) -> list[Any]:
    import torch  # a torch tensor is among the values: torch is loaded already

    return [torch.as_tensor(v) for v in values]


def cat(values: Sequence[Array]) -> Array:
    """Concatenate along the first axis."""
    if _is_numpy(values):
        return np.concatenate(values)
    import torch

    return torch.cat(_as_tensors(values))


def stack(values: Sequence[Array]) -> Array:
    """Stack along a new first axis."""
    if _is_numpy(values):
        return np.stack(values)
    import torch

    return torch.stack(_as_tensors(values))


def like(value: Array, reference: Array) -> Array:
    """``value`` in ``reference``'s array type and dtype (and device, for tensors)."""
    if isinstance(reference, np.ndarray):
        return np.asarray(to_numpy(value), dtype=reference.dtype)
    import torch

    return torch.as_tensor(value).to(reference.device, reference.dtype)


def to_numpy(value: Array) -> np.ndarray:
    """A numpy view or copy of ``value`` (tensors leave the GPU; 16-bit floats become float32)."""
    if isinstance(value, np.ndarray):
        return value
    tensor = value.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype.itemsize < 4:
        tensor = tensor.float()
    return tensor.numpy()
