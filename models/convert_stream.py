"""Tensor-by-tensor reading of checkpoint shards and writing of safetensors shards.

Reading: safetensors shards are opened lazily (``safe_open``), PyTorch ``.bin`` shards with
``torch.load(weights_only=True, mmap=True)``; one source shard is open at a time. Writing:
the output layout (names, dtypes, shapes, shard boundaries) is planned first, so each
output file's header is written before its tensors, and each tensor is written as soon as
it is read. Peak memory is one source shard's touched pages plus one tensor.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from loc3r.errors import ModelError
from loc3r.fileio import check_readable_file, write_json_atomic

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
OUTPUT_INDEX = "model.safetensors.index.json"
OUTPUT_SINGLE = "model.safetensors"
_FIX = "download the checkpoint again"


@dataclass(frozen=True)
class TensorInfo:
    """What is known of a tensor before reading it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int | None = None  # where the data starts in a safetensors file (bytes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: Path, fix: str = _FIX) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of a safetensors file; a truncated or corrupt file is a
    one-line ``ModelError`` ending in ``fix``."""
    check_readable_file(path, "checkpoint file")
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(stream.read(length))
        header.pop("__metadata__", None)
        infos = {
            name: TensorInfo(SAFETENSORS_DTYPES[h["dtype"]], tuple(h["shape"]), 8 + length + h["data_offsets"][0])
            for name, h in header.items()
        }
        end = max((h["data_offsets"][1] for h in header.values()), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc})", fix) from None
    if 8 + length + end > size:
        raise ModelError(f"{path} is truncated ({size} bytes, its header needs {8 + length + end})", fix)
    return infos


def load_tensor_pickle(path: Path, what: str, fix: str, mmap: bool = False) -> Any:
    """``torch.load`` of tensors and plain containers only (``weights_only``): a file holding
    any other Python object is refused in one line, never loaded (that could run code)."""
    check_readable_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise ModelError(
            f"{path} holds Python objects besides tensors, which loc3r never loads (they could run code)", fix
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zipfile errors, ...
        raise ModelError(f"{path} is not a readable {what} ({type(exc).__name__})", fix) from None


def _load_bin(path: Path) -> dict[str, Tensor]:
    """A PyTorch ``.bin`` shard, memory-mapped, tensors only."""
    state = load_tensor_pickle(path, "PyTorch shard", _FIX, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors", _FIX)
    return state


class SourceShards:
    """A checkpoint split over safetensors or ``.bin`` files, read one file at a time."""

    def __init__(self, files: list[Path]) -> None:
        self.infos: dict[str, TensorInfo] = {}
        self.file_of: dict[str, Path] = {}
        for path in files:
            if not path.is_file():
                raise ModelError(f"checkpoint shard {path} is missing", "download all shards of the checkpoint")
            for name, info in self._header(path).items():
                self.infos[name] = info
                self.file_of[name] = path

    @staticmethod
    def _header(path: Path) -> dict[str, TensorInfo]:
        if path.suffix == ".safetensors":
            return read_safetensors_header(path)
        state = _load_bin(path)
        return {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in state.items()}

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, tensor)`` for ``names`` in that order, keeping one file open."""
        current: Path | None = None
        handle: object = None
        for name in names:
            path = self.file_of[name]
            if path != current:
                handle, current = None, path  # release the previous file before opening the next
                handle = self._open(path)
            yield name, self._get(handle, name, path)

    @staticmethod
    def _open(path: Path) -> object:
        if path.suffix == ".safetensors":
            try:
                return safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise ModelError(f"{path} is not a readable safetensors file ({exc})", _FIX) from None
        return _load_bin(path)

    @staticmethod
    def _get(handle: object, name: str, path: Path) -> Tensor:
        if isinstance(handle, dict):
            return handle[name]
        try:
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read {name} from {path} ({exc})", _FIX) from None


def plan_shards(infos: dict[str, TensorInfo], max_shard_bytes: int) -> list[list[str]]:
    """Split names (in order) into shards of at most ``max_shard_bytes`` (a bigger tensor
    gets a shard of its own); a tensor whose offset would not be a multiple of its element
    size starts a new shard, so every tensor is aligned."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, info in infos.items():
        aligned = filled % max(info.dtype.itemsize, 1) == 0
        if shards[-1] and (filled + info.nbytes > max_shard_bytes or not aligned):
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += info.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """Hugging Face file names: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``."""
    if count == 1:
        return [OUTPUT_SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_bytes(names: list[str], infos: dict[str, TensorInfo]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        info = infos[name]
        header[name] = {
            "dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shards(
    out_dir: Path, infos: dict[str, TensorInfo], tensors: Iterable[tuple[str, Tensor]], max_shard_bytes: int
) -> list[str]:
    """Write ``tensors`` (yielded in the order of ``infos``, with those dtypes and shapes) as
    safetensors shards plus an index when there is more than one; returns the file names."""
    shards = plan_shards(infos, max_shard_bytes)
    files = shard_names(len(shards))
    stream = iter(tensors)
    for names, file in zip(shards, files):
        with (out_dir / file).open("wb") as out:
            out.write(_header_bytes(names, infos))
            for expected in names:
                name, tensor = next(stream)
                info = infos[name]
                if name != expected or tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
                    raise ValueError(f"tensor stream out of plan at {name} (expected {expected} {info})")
                out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    if len(files) > 1:
        weight_map = {name: file for names, file in zip(shards, files) for name in names}
        total = sum(info.nbytes for info in infos.values())
        write_json_atomic(out_dir / OUTPUT_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files
