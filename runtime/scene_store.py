"""Scene memory: a video prefix's KV cache on disk, so re-opening a known video loads it
instead of prefilling it again.

A scene is the LLM's KV cache after the whole video prefix (system turn, frame blocks,
video end, time instruction), per layer key then value, in the LLM's KV dtype (``float32``
on CPU, torch or the onnxruntime builder's CPU graphs; ``float16`` on GPU targets;
``bfloat16`` stored as its bits), or compressed to int8 with one float32 scale per head and
channel (``compression="int8"``; its effect on pose and logits is in
``benchmarks/results/scenes_small.md``). An entry sits in the encoding cache's folder under
``scenes/``, is named by the encoding cache's key (the video's identity, the model, backend,
artifacts fingerprint, dtype and sizes), and is one safetensors file written atomically
whose metadata holds its description and a SHA-256 over every tensor and that description,
verified whole on read. A damaged or foreign entry is discarded with one warning and the
prefix recomputed. The folder is kept under a byte budget: least recently used entries
(file modification time, touched on every load) go first.

numpy only: the onnxruntime path needs no torch for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from loc3r.fileio import atomic_file

log = logging.getLogger(__name__)
SCENE_VERSION = 1
SUFFIX = ".kv.safetensors"
COMPRESSIONS = ("none", "int8")
DEFAULT_BUDGET_BYTES = 4 << 30  # ten 7B scenes of 32 frames in fp16 (~0.4 GB each)
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


@dataclass(frozen=True)
class KVLayout:
    """What a cache's arrays look like: ``arrays`` = 2 x layers, each (kv_heads, length, head_dim)."""

    arrays: int
    kv_heads: int
    head_dim: int
    dtype: str


@dataclass
class Scene:
    """A video prefix's KV and the video it describes."""

    kv: list[np.ndarray]  # per layer key then value: (kv heads, length, head dim)
    kv_dtype: str  # the LLM's; a decompressed int8 entry holds float32 arrays the LLM casts
    blocks_end: int  # cache length after the last frame block
    indices: list[int]
    timestamps_s: list[float]
    duration_s: float
    bev: np.ndarray | None = None  # (frames, tokens, 2) when the prefill computed it

    @property
    def length(self) -> int:
        return int(self.kv[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv)


@dataclass(frozen=True)
class SceneEntry:
    """One stored scene: its key, file, size and when it was last used (Unix seconds)."""

    key: str
    path: Path
    nbytes: int
    used_at: float


class SceneStore:
    """A folder of scenes under ``budget_bytes`` (LRU)."""

    def __init__(self, root: Path, budget_bytes: int = DEFAULT_BUDGET_BYTES, compression: str = "none") -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown scene compression {compression!r} (one of {', '.join(COMPRESSIONS)})")
        self.root, self.budget_bytes, self.compression = root, budget_bytes, compression
        self.writable = True

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def load(self, key: str, layout: KVLayout) -> Scene | None:
        """The scene stored under ``key`` for a cache of ``layout``; None when absent or unusable
        (then discarded, with one warning)."""
        path = self.path(key)
        try:
            if not path.exists():
                return None
            if not path.is_file():
                raise ValueError("not a file")
            with safe_open(str(path), "numpy") as entry:
                meta = entry.metadata() or {}
                tensors = {name: entry.get_tensor(name) for name in entry.keys()}  # noqa: SIM118 - safe_open has no iterator
            if tensor_digest(tensors, meta.get("scene", "")) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            scene = _checked(json.loads(meta["scene"]), tensors, key, layout)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("stored scene %s is unusable (%s): discarded, recomputing the video prefix", path.name, exc)
            with contextlib.suppress(OSError):
                if path.is_file():
                    path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # last used: the LRU order
        return scene

    def store(self, key: str, scene: Scene) -> Path | None:
        """Write ``scene`` atomically, then evict least recently used scenes beyond the budget;
        None when it cannot be written or alone exceeds the budget."""
        if not self.writable:
            return None
        tensors = _encode(scene.kv, self.compression)
        if scene.bev is not None:
            tensors["bev"] = np.ascontiguousarray(scene.bev, dtype=np.float32)
        description = json.dumps({
            "v": SCENE_VERSION, "key": key, "kv_dtype": scene.kv_dtype, "compression": self.compression,
            "blocks_end": scene.blocks_end, "indices": scene.indices, "timestamps_s": scene.timestamps_s,
            "duration_s": scene.duration_s,
        })
        data = save(tensors, metadata={"scene": description, "sha256": tensor_digest(tensors, description)})
        if len(data) > self.budget_bytes:
            log.warning("a scene of %.1f MB exceeds the scene store's budget of %.1f MB: not stored",
                        len(data) / 1e6, self.budget_bytes / 1e6)
            return None
        path = self.path(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as stream:
                stream.write(data)
        except OSError as exc:
            self.writable = False
            log.warning("cannot write the scene store in %s (%s): going on without it", self.root, exc.strerror or exc)
            return None
        self.evict(keep=key)
        return path

    def entries(self) -> list[SceneEntry]:
        """Stored scenes, least recently used first."""
        found = []
        for path in self.root.glob(f"*{SUFFIX}") if self.root.is_dir() else ():
            with contextlib.suppress(OSError):
                stat = path.stat()
                found.append(SceneEntry(path.name.removesuffix(SUFFIX), path, stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda e: (e.used_at, e.key))

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries())

    def remove(self, key: str) -> bool:
        """Delete the scene stored under ``key``; False if there was none."""
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least recently used scenes (never ``keep``) until within budget; their keys."""
        entries = self.entries()
        total, dropped = sum(e.nbytes for e in entries), []
        for entry in entries:
            if total <= self.budget_bytes:
                break
            if entry.key == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                entry.path.unlink()
            total -= entry.nbytes
            dropped.append(entry.key)
        return dropped


def tensor_digest(tensors: dict[str, np.ndarray], description: str) -> str:
    """SHA-256 over the tensors' names and bytes (sorted by name) and the description."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(memoryview(np.ascontiguousarray(tensors[name])).cast("B"))
    digest.update(description.encode("utf-8"))
    return digest.hexdigest()


def quantize_int8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per head and channel (max |x| over positions / 127)."""
    values = array.astype(np.float32)
    scale = np.abs(values).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.rint(values / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def _encode(kv: list[np.ndarray], compression: str) -> dict[str, np.ndarray]:
    if compression == "none":
        return {f"kv.{i}": np.ascontiguousarray(a) for i, a in enumerate(kv)}
    tensors = {}
    for i, array in enumerate(kv):
        tensors[f"kv.{i}.q"], tensors[f"kv.{i}.scale"] = quantize_int8(_as_float(array))
    return tensors


def _as_float(array: np.ndarray) -> np.ndarray:
    """float32 values of a KV array (``bfloat16`` bits, ``uint16``, widened)."""
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def _checked(entry: Any, tensors: dict[str, np.ndarray], key: str, layout: KVLayout) -> Scene:
    """The scene, once its description agrees with its key, the cache's layout and its tensors."""
    if not isinstance(entry, dict) or entry.get("key") != key or entry.get("v") != SCENE_VERSION:
        raise ValueError("it belongs to another video, model or version")
    if entry.get("kv_dtype") != layout.dtype:
        raise ValueError(f"its KV is {entry.get('kv_dtype')}, the LLM's is {layout.dtype}")
    compression = entry.get("compression")
    if compression == "none":
        kv = [tensors[f"kv.{i}"] for i in range(layout.arrays)]
        expected_dtype = np.dtype(_NUMPY_DTYPES[layout.dtype])
    elif compression == "int8":
        kv = [_dequantized(tensors[f"kv.{i}.q"], tensors[f"kv.{i}.scale"]) for i in range(layout.arrays)]
        expected_dtype = np.dtype(np.float32)
    else:
        raise ValueError(f"unknown compression {compression!r}")
    length = kv[0].shape[1] if kv[0].ndim == 3 else -1
    for array in kv:
        if array.shape != (layout.kv_heads, length, layout.head_dim) or array.dtype != expected_dtype:
            raise ValueError(f"a KV array of shape {array.shape} {array.dtype}, expected ({layout.kv_heads}, "
                             f"{length}, {layout.head_dim}) {expected_dtype}")
    indices, stamps, duration = entry.get("indices"), entry.get("timestamps_s"), entry.get("duration_s")
    blocks_end = entry.get("blocks_end")
    if not (isinstance(blocks_end, int) and 0 < blocks_end <= length):
        raise ValueError(f"its frame blocks end at {blocks_end!r}, outside its {length} positions")
    if not (isinstance(indices, list) and isinstance(stamps, list) and len(indices) == len(stamps) >= 1):
        raise ValueError("its frame indices and timestamps do not match")
    if not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in [*stamps, duration]):
        raise ValueError("a timestamp or the duration is not a finite number >= 0")
    bev = tensors.get("bev")
    if bev is not None and (bev.ndim != 3 or bev.shape[0] != len(indices) or bev.shape[2] != 2):
        raise ValueError(f"its BEV points of shape {bev.shape} do not match its {len(indices)} frames")
    return Scene(kv, layout.dtype, blocks_end, list(indices), [float(t) for t in stamps], float(duration), bev)


def _dequantized(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if q.dtype != np.int8 or scale.shape != (q.shape[0], 1, q.shape[-1]):
        raise ValueError("an int8 KV array and its scales do not match")
    return q.astype(np.float32) * scale
