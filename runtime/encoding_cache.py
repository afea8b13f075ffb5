"""On-disk cache of a video's encoded frame blocks, so a second run skips decode and encode.

An entry is keyed by the video's content hash, the model checksum, the backend, the
sampling and the resolutions. It is one safetensors file written atomically; the tensor
bytes' SHA-256 is stored in its metadata and verified on read: a corrupt entry is
discarded with a warning and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from loc3r.fileio import atomic_file
from loc3r.runtime.session import FrameBlocks

log = logging.getLogger(__name__)
CACHE_VERSION = 1


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


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class EncodingCache:
    """A folder of encoded videos."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def key(self, video: Path, **settings: object) -> str:
        """Entry name for ``video`` under ``settings`` (model checksum, backend, frames, sizes)."""
        identity = json.dumps({"v": CACHE_VERSION, "video": file_digest(video), **settings}, sort_keys=True)
        return hashlib.sha256(identity.encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> CachedVideo | None:
        """The entry, or None when absent; a corrupt entry is removed and reported."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as stream:
                header_len = int.from_bytes(stream.read(8), "little")
                meta = json.loads(stream.read(header_len))["__metadata__"]
            blocks = load_file(str(path))["blocks"]
            if tensor_digest(blocks) != meta["sha256"]:
                raise ValueError("checksum mismatch")
            encoded = FrameBlocks(list(blocks.unbind(0)), json.loads(meta["indices"]), json.loads(meta["timestamps_s"]))
            return CachedVideo(encoded, float(meta["duration_s"]))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("encoding cache entry %s is corrupt (%s): discarded, recomputing", path.name, exc)
            path.unlink(missing_ok=True)
            return None

    def store(self, key: str, encoded: FrameBlocks, duration_s: float) -> Path:
        """Write the entry atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        blocks = encoded.stacked().contiguous().cpu()
        meta = {
            "sha256": tensor_digest(blocks),
            "indices": json.dumps(encoded.indices),
            "timestamps_s": json.dumps(encoded.timestamps_s),
            "duration_s": repr(duration_s),
        }
        path = self.path(key)
        with atomic_file(path, "wb") as stream:
            stream.write(save({"blocks": blocks}, metadata=meta))
        return path
