"""Which file a client's video URL may name, and nothing else.

Accepted: an upload id (``vid_...``), a path relative to the media folder, ``live:NAME``
for a live source the operator declared, and ``http(s)://`` only with ``--allow-remote-urls``.
Refused: ``file://`` and every other scheme, absolute paths, ``..``, and any path whose
real location (symlinks followed) lies outside the media folder.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loc3r.errors import InputError
from loc3r.identity import file_identity
from loc3r.serve.download import AddressPolicy
from loc3r.serve.errors import ApiError
from loc3r.serve.settings import ServeSettings
from loc3r.serve.uploads import UPLOAD_ID, VIDEO_SUFFIXES, UploadStore

LIVE_PREFIX = "live:"
# the media listing's bounds: a folder like a project checkout (.venv: 40k files) answers at once
MAX_LISTED = 500
MAX_SCANNED = 5000
MAX_DEPTH = 4
MAX_SCAN_S = 1.0
# container signatures: ISO BMFF box types at bytes 4-8, Matroska's EBML id, MPEG-PS pack/sequence headers
SNIFF_BYTES = 3 * 192
ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
MATROSKA = b"\x1a\x45\xdf\xa3"
MPEG_PS = (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")
TS_SYNC, TS_PACKET = 0x47, 188
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class VideoRef:
    """A resolved video: ``key`` names its content (a changed file is another video)."""

    key: tuple[object, ...]
    url: str
    path: Path | None = None  # the file to decode; None for a live source
    live: str | None = None  # the live source's name


class MediaResolver:
    """Turns ``video_url`` values into files under the allowed folders."""

    def __init__(self, settings: ServeSettings, uploads: UploadStore) -> None:
        self.settings = settings
        self.uploads = uploads
        self.media_root = settings.media_dir.resolve() if settings.media_dir else None
        self.addresses = AddressPolicy(settings.allow_private_urls)

    def resolve(self, url: str) -> VideoRef:
        url = url.strip()
        if not url:
            raise ApiError(400, "the video URL is empty", "invalid_video_url", "video_url")
        if "\x00" in url:
            raise ApiError(400, "the video URL contains a NUL byte", "invalid_video_url", "video_url")
        if url.startswith(LIVE_PREFIX):
            return self._live(url[len(LIVE_PREFIX) :])
        if UPLOAD_ID.match(url):
            return _file_ref(("upload", url), url, self.uploads.path(url))
        if _SCHEME.match(url):
            return self._remote(url)
        return self._media_file(url)

    def scene(self, name_or_url: str) -> tuple[VideoRef, int | None]:
        """A scene named with ``loc3r-scene add`` (the operator's, so any path) and its frame
        count, else a video URL as :meth:`resolve` takes it (frames: None)."""
        from loc3r.runtime.scenes import NAME, read_scenes

        named = read_scenes().get(name_or_url) if NAME.fullmatch(name_or_url) else None
        if named is None:
            return self.resolve(name_or_url), None
        return _file_ref(("scene", name_or_url), name_or_url, Path(named.video)), named.frames

    def content(self, url: str) -> VideoRef:
        """The file behind an upload id or a media-folder video, to serve its bytes (never
        a download, a live source, or a media-folder file that is not named as a video);
        its key ends in the file's identity (the ETag)."""
        if url.startswith(LIVE_PREFIX) or _SCHEME.match(url.strip()):
            raise ApiError(400, "only uploaded and media-folder videos have content to show", "no_content", "url")
        ref = self.resolve(url)
        if ref.key[0] == "file" and ref.path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ApiError(403, f"{url!r} is not named as a video ({', '.join(VIDEO_SUFFIXES)})", "not_a_video", "url")
        return ref

    def _live(self, name: str) -> VideoRef:
        if name not in self.settings.live_sources:
            known = ", ".join(LIVE_PREFIX + n for n in self.settings.live_sources) or "none"
            raise ApiError(404, f"no live source {name!r} (declared: {known})", "live_source_not_found", "video_url")
        return VideoRef(("live", name), LIVE_PREFIX + name, live=name)

    def _remote(self, url: str) -> VideoRef:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ApiError(
                403, f"{scheme}: video URLs are refused; name a video by its path relative to the media folder or its upload id",
                "url_scheme_refused", "video_url",
            )
        if not self.settings.allow_remote_urls:
            raise ApiError(
                403, "remote video URLs are disabled on this server; upload the video (POST /v1/videos) "
                "or start the server with --allow-remote-urls", "remote_urls_disabled", "video_url",
            )
        info = self.uploads.fetch(url, self.settings.remote_timeout_s, self.addresses)
        return _file_ref(("upload", info.id), url, self.uploads.path(info.id))

    def _media_file(self, url: str) -> VideoRef:
        real = self._media_path(url)
        return _file_ref(("file", str(real)), url, real)

    def _media_path(self, url: str) -> Path:
        """The real path of a media-folder video, once it is known to lie inside the folder."""
        if self.media_root is None:
            raise ApiError(404, f"{url!r}: this server has no media folder; upload the video (POST /v1/videos)", "video_not_found", "video_url")
        relative = PurePosixPath(url)
        if relative.is_absolute() or ".." in relative.parts:
            raise ApiError(
                403, f"{url!r}: name a video by its path relative to the media folder (no leading /, no ..)", "path_outside_media", "video_url"
            )
        try:
            real = (self.media_root / relative).resolve(strict=True)
        except (OSError, RuntimeError):
            raise ApiError(404, f"no video {url!r} in the media folder", "video_not_found", "video_url") from None
        if not real.is_relative_to(self.media_root):
            raise ApiError(403, f"{url!r} leads outside the media folder (a symlink out)", "path_outside_media", "video_url")
        if not real.is_file():
            raise ApiError(400, f"{url!r} is not a regular file", "invalid_video_url", "video_url")
        return real

    def media_files(self) -> MediaListing:
        """The videos in the media folder by relative path (see :class:`MediaListing`)."""
        if self.media_root is None:
            return MediaListing([], None)
        return scan_videos(self.media_root, self._listable)

    def _listable(self, relative: str) -> bool:
        try:
            self._media_path(relative)
        except ApiError:
            return False
        return True


@dataclass(frozen=True)
class MediaListing:
    """Relative paths of real videos (a video suffix and a container signature), hidden
    folders and files skipped (``.venv``, ``.git``); ``bounded`` says why the scan stopped
    early (too many files, too deep, too long), None when it saw the whole folder."""

    paths: list[str]
    bounded: str | None

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)


def scan_videos(root: Path, listable: Callable[[str], bool] = lambda _: True) -> MediaListing:
    """Walk ``root`` for videos within the scan's bounds (``MAX_LISTED`` videos, ``MAX_SCANNED``
    files, ``MAX_DEPTH`` folders deep, ``MAX_SCAN_S`` seconds)."""
    found: list[str] = []
    scanned, deadline, bounded = 0, time.monotonic() + MAX_SCAN_S, None
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        kept = sorted(d for d in dirs if not d.startswith("."))
        if depth >= MAX_DEPTH and kept:
            bounded = bounded or f"folders deeper than {MAX_DEPTH} levels are not listed"
            kept = []
        dirs[:] = kept
        for name in sorted(files):
            scanned += 1
            if scanned > MAX_SCANNED or time.monotonic() > deadline:
                why = f"more than {MAX_SCANNED} files" if scanned > MAX_SCANNED else f"the scan took over {MAX_SCAN_S:g} s"
                return MediaListing(found, f"listing stopped: {why} in the media folder; point --media-dir at a folder of videos")
            if name.startswith(".") or Path(name).suffix.lower() not in VIDEO_SUFFIXES:
                continue
            relative = Path(folder, name).relative_to(root).as_posix()
            if is_video_container(Path(folder, name)) and listable(relative):
                found.append(relative)
                if len(found) == MAX_LISTED:
                    return MediaListing(found, f"listing stopped at {MAX_LISTED} videos; name others by their path")
    return MediaListing(found, bounded)


def is_video_container(path: Path) -> bool:
    """Whether the file starts like a video container (MP4/MOV, Matroska/WebM, AVI, MPEG-TS,
    MPEG-PS): a cheap read of its first bytes, enough to tell ``x.d.ts`` from ``x.ts``."""
    try:
        with path.open("rb") as stream:
            head = stream.read(SNIFF_BYTES)
    except OSError:
        return False
    if head[4:8] in ISO_BOXES or head[:4] == MATROSKA or head[:4] in MPEG_PS:
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return True
    for offset, size in ((0, TS_PACKET), (4, TS_PACKET + 4)):  # MPEG-TS: a sync byte every 188 bytes (M2TS: 192, after a timestamp)
        syncs = range(offset, len(head), size)
        if len(syncs) >= 2 and all(head[i] == TS_SYNC for i in syncs):
            return True
    return False


def _file_ref(kind: tuple[str, str], url: str, path: Path) -> VideoRef:
    """A file's reference, keyed by what it is now (``loc3r.identity``: a replaced or
    rewritten file, even with its size and mtime put back, is decoded afresh)."""
    try:
        identity = file_identity(path)
    except (OSError, InputError):
        raise ApiError(404, f"no readable video {url!r}", "video_not_found", "video_url") from None
    return VideoRef((*kind, identity), url, path)
