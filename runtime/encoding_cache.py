"""On-disk cache of a video's encoded frame blocks, so a second run skips decode and encode.

An entry is keyed by the video's content hash (remembered in the user's digest memo while
the file's identity, ``loc3r.identity``, is unchanged) and by what produced the blocks: the model
checksum, the backend and its artifacts' fingerprint (an export's file digests), the dtype,
the frame count and the resolutions. It is one safetensors file written atomically whose
metadata holds the entry's description (key, frame indices, timestamps, duration) and a
SHA-256 over the tensor bytes and that description; both are verified on read, with the
shapes, so nothing in an entry is used unchecked.

The cache never stops an answer: an entry that cannot be read or does not verify is
discarded with a warning and recomputed; a cache folder that cannot be written (read-only,
full disk, a folder where an entry should be) is reported once and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from loc3r.digest import DigestMemo
from loc3r.fileio import atomic_file
from loc3r.runtime.arrays import to_numpy
from loc3r.runtime.session import FrameBlocks

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 3: blocks stored through numpy (16-bit PyTorch blocks as float32)


@dataclass(frozen=True)
class CachedVideo:
    encoded: FrameBlocks
    duration_s: float


def file_digest(path: Path) -> str:
    """BLAKE2b of the file's bytes (streamed)."""
    digest = hashlib.blake2b(digest_size=20)
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_digest(blocks: np.ndarray, description: str) -> str:
    """SHA-256 over the array's bytes and the entry's description (its metadata)."""
    digest = hashlib.sha256(np.ascontiguousarray(blocks).tobytes())
    digest.update(description.encode("utf-8"))
    return digest.hexdigest()


class EncodingCache:
    """A folder of encoded videos."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writable = True

    def key(self, video: Path, **producer: object) -> str:
        """Entry name for ``video`` encoded by ``producer`` (model, backend, artifacts, sizes)."""
        memo = DigestMemo()  # the content digest, remembered while the file's identity holds
        try:
            content = memo.remember([video], "blake2b-160", lambda: file_digest(video))
        finally:
            memo.save()
        identity = json.dumps({"v": CACHE_VERSION, "video": content, **producer}, sort_keys=True)
        return hashlib.sha256(identity.encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, block_shape: tuple[int, int]) -> CachedVideo | None:
        """The entry (blocks of ``block_shape``: tokens, width), or None when absent or unusable."""
        path = self.path(key)
        try:
            if not path.exists():
                return None
            if not path.is_file():
                raise ValueError("not a file")
            with safe_open(str(path), "np") as entry:
                meta = entry.metadata() or {}
                blocks = entry.get_tensor("blocks")
            if entry_digest(blocks, meta.get("entry", "")) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            return _checked(json.loads(meta["entry"]), blocks, key, block_shape)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("encoding cache entry %s is corrupt (%s): discarded, recomputing", path.name, exc)
            with contextlib.suppress(OSError):
                if path.is_file():
                    path.unlink()
            return None

    def store(self, key: str, encoded: FrameBlocks, duration_s: float) -> Path | None:
        """Write the entry atomically; None (and one warning) when the cache cannot be written."""
        if not self.writable:
            return None
        blocks = np.ascontiguousarray(to_numpy(encoded.stacked()))
        description = json.dumps(
            {"key": key, "indices": encoded.indices, "timestamps_s": encoded.timestamps_s, "duration_s": duration_s}
        )
        path = self.path(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as stream:
                stream.write(save({"blocks": blocks}, metadata={"entry": description, "sha256": entry_digest(blocks, description)}))
        except OSError as exc:
            self.writable = False
            log.warning("cannot write the encoding cache in %s (%s): going on without it", self.root, exc.strerror or exc)
            return None
        return path


def _checked(entry: Any, blocks: np.ndarray, key: str, block_shape: tuple[int, int]) -> CachedVideo:
    """The cached video, once its description agrees with its key and its tensor."""
    if not isinstance(entry, dict) or entry.get("key") != key:
        raise ValueError("it belongs to another key")
    indices, stamps, duration = entry.get("indices"), entry.get("timestamps_s"), entry.get("duration_s")
    frames = blocks.shape[0] if blocks.ndim == 3 else -1
    if tuple(blocks.shape[1:]) != tuple(block_shape) or not np.issubdtype(blocks.dtype, np.floating) or frames < 1:
        raise ValueError(f"blocks of shape {tuple(blocks.shape)}, expected (frames, {block_shape[0]}, {block_shape[1]})")
    if not (isinstance(indices, list) and isinstance(stamps, list) and len(indices) == len(stamps) == frames):
        raise ValueError(f"its frame indices and timestamps do not describe its {frames} blocks")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ValueError("a frame index is not a whole number >= 0")
    if not all(_finite_number(t) and t >= 0 for t in [*stamps, duration]):
        raise ValueError("a timestamp or the duration is not a finite number >= 0")
    if not bool(np.isfinite(blocks).all()):
        raise ValueError("non-finite values in the blocks")
    return CachedVideo(FrameBlocks(list(blocks), indices, [float(t) for t in stamps]), float(duration))


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
