"""Safetensors tensors memory-mapped in place: read when used, handed back afterwards.

A tensor from :class:`MappedShards` is a view of the file's pages (no copy): its bytes
become resident only when something reads them, and :meth:`MappedShards.release` gives
the pages that were read back to the kernel (``MADV_DONTNEED`` on a private, read-only
mapping; a later read faults them in again from the file). Exporting a 7B LLM through it
keeps about one weight resident at a time instead of the whole checkpoint.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import torch
from torch import Tensor

from loc3r.errors import ModelError
from loc3r.models.convert_stream import TensorInfo, read_safetensors_header


class MappedShards:
    """The tensors of safetensors files, each a zero-copy view of its file."""

    def __init__(self, files: list[Path]) -> None:
        self._maps: list[mmap.mmap] = []
        self._where: dict[str, tuple[mmap.mmap, TensorInfo]] = {}
        for path in files:
            infos = read_safetensors_header(path)
            with path.open("rb") as stream:
                # ACCESS_COPY: private and writable, so torch shares the pages without a copy
                mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps.append(mapped)
            self._where.update({name: (mapped, info) for name, info in infos.items()})

    def names(self) -> list[str]:
        return list(self._where)

    def tensor(self, name: str) -> Tensor:
        """The tensor ``name``, backed by the mapped file."""
        if name not in self._where:
            raise ModelError(f"the weights have no tensor {name!r}", "re-create the bundle with loc3r-convert")
        mapped, info = self._where[name]
        count = math.prod(info.shape)
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(mapped, dtype=info.dtype, count=count, offset=info.offset).view(info.shape)

    def release(self) -> None:
        """Return every page read so far to the kernel; the views stay valid."""
        for mapped in self._maps:
            mapped.madvise(mmap.MADV_DONTNEED)
