"""Uploaded (and, when enabled, downloaded) videos: ``vid_<24 hex>`` files in one folder.

Each video is checked with ``probe_video`` before it gets an id, so a non-video is refused
at upload time. Beside it, ``<id>.json`` records the client's file name and the size; the
oldest videos are deleted when the folder grows past its budget.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit
from typing import BinaryIO

from loc3r.errors import InputError
from loc3r.fileio import write_json_atomic
from loc3r.runtime.video import probe_video
from loc3r.serve.download import AddressPolicy, download, too_large
from loc3r.serve.errors import ApiError

UPLOAD_ID = re.compile(r"^vid_[0-9a-f]{24}$")
VIDEO_TYPES = {
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska", ".webm": "video/webm",
    ".avi": "video/x-msvideo", ".ts": "video/mp2t", ".mpg": "video/mpeg", ".mpeg": "video/mpeg",
}
VIDEO_SUFFIXES = tuple(VIDEO_TYPES)
CHUNK = 1 << 20


@dataclass(frozen=True)
class UploadInfo:
    id: str
    filename: str
    bytes: int
    created_at: float  # seconds since the epoch (microseconds kept: uploads are evicted oldest first)
    frames: int
    duration_s: float
    width: int
    height: int

    def to_dict(self) -> dict[str, object]:
        return {"object": "video", "source": "upload", **asdict(self)}


class UploadStore:
    """The upload folder: save (size-limited, probed), look up by id, list, evict the oldest."""

    def __init__(self, root: Path, max_bytes: int, store_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.store_bytes = store_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fetched: dict[str, str] = {}  # remote URL -> id

    def path(self, video_id: str) -> Path:
        """The stored file of ``video_id``; 404 when there is none."""
        info = self.info(video_id)
        return self.root / (info.id + Path(info.filename).suffix.lower() if _known_suffix(info.filename) else info.id)

    def info(self, video_id: str) -> UploadInfo:
        if not UPLOAD_ID.match(video_id):
            raise ApiError(404, f"no video {video_id!r}: ids look like vid_ followed by 24 hex digits", "video_not_found")
        try:
            return UploadInfo(**json.loads((self.root / f"{video_id}.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            raise ApiError(404, f"no video {video_id!r} on this server (deleted or never uploaded)", "video_not_found") from None

    def list(self) -> list[UploadInfo]:
        infos = []
        for sidecar in self.root.glob("vid_*.json"):
            try:
                infos.append(self.info(sidecar.stem))
            except ApiError:
                continue
        return sorted(infos, key=lambda info: info.created_at)

    def save(self, source: BinaryIO, filename: str) -> UploadInfo:
        """Copy ``source`` into the folder, probe it, and give it an id (blocking: run in a thread)."""
        video_id = "vid_" + secrets.token_hex(12)
        suffix = Path(filename).suffix.lower() if _known_suffix(filename) else ""
        target = self.root / f"{video_id}{suffix}"
        fd, tmp = tempfile.mkstemp(prefix=f".{video_id}.", suffix=suffix, dir=self.root)
        try:
            with os.fdopen(fd, "wb") as out:
                size = _copy_limited(source, out, self.max_bytes)
            if size == 0:
                raise ApiError(400, "the uploaded file is empty", "empty_upload", "file")
            try:
                probe = probe_video(tmp)
            except InputError as exc:
                reason = exc.problem.split(": ", 1)[-1]
                raise ApiError(400, f"{filename or 'the upload'} is not a readable video ({reason})", "invalid_video", "file") from None
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        info = UploadInfo(
            video_id, Path(filename).name or video_id, size, round(time.time(), 6),
            probe.total_frames, round(probe.duration_s, 3), *probe.display_size,
        )
        write_json_atomic(self.root / f"{video_id}.json", asdict(info))
        self._evict(keep=video_id)
        return info

    def fetch(self, url: str, timeout_s: float, policy: AddressPolicy) -> UploadInfo:
        """Download a remote video once (size-limited, ``timeout_s`` in all, only from
        addresses ``policy`` allows) and keep it as an upload."""
        with self._lock:
            known = self._fetched.get(url)
        if known:
            try:
                return self.info(known)
            except ApiError:
                pass
        fd, tmp = tempfile.mkstemp(prefix=".download.", dir=self.root)
        try:
            with os.fdopen(fd, "w+b") as body:
                final = download(url, body, self.max_bytes, timeout_s, policy)
                body.seek(0)
                info = self.save(body, Path(urllib.request.url2pathname(urlsplit(final).path)).name)
        finally:
            Path(tmp).unlink(missing_ok=True)
        with self._lock:
            self._fetched[url] = info.id
        return info

    def _evict(self, keep: str) -> None:
        """Delete the oldest videos until the folder fits its budget (never ``keep``)."""
        with self._lock:
            infos = self.list()
            total = sum(info.bytes for info in infos)
            for info in infos:
                if total <= self.store_bytes:
                    return
                if info.id == keep:
                    continue
                self.path(info.id).unlink(missing_ok=True)
                (self.root / f"{info.id}.json").unlink(missing_ok=True)
                total -= info.bytes


def video_type(path: Path) -> str:
    """The media type a video is served with (never a type a browser would render as a page)."""
    return VIDEO_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _known_suffix(filename: str) -> bool:
    return Path(filename).suffix.lower() in VIDEO_SUFFIXES


def _copy_limited(source: BinaryIO, out: BinaryIO, limit: int) -> int:
    size = 0
    for block in iter(lambda: source.read(CHUNK), b""):
        size += len(block)
        if size > limit:
            raise too_large(limit)
        out.write(block)
    return size
