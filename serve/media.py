"""Which file a client's video URL may name, and nothing else.

Accepted: an upload id (``vid_...``), a path relative to the media folder, ``live:NAME``
for a live source the operator declared, and ``http(s)://`` only with ``--allow-remote-urls``.
Refused: ``file://`` and every other scheme, absolute paths, ``..``, and any path whose
real location (symlinks followed) lies outside the media folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loc3r.errors import InputError
from loc3r.identity import file_identity
from loc3r.serve.download import AddressPolicy
from loc3r.serve.errors import ApiError
from loc3r.serve.settings import ServeSettings
from loc3r.serve.uploads import UPLOAD_ID, VIDEO_SUFFIXES, UploadStore

LIVE_PREFIX = "live:"
MAX_LISTED = 500
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

    def media_files(self) -> Iterator[str]:
        """Relative paths of the videos in the media folder (symlinks out skipped), at most MAX_LISTED."""
        if self.media_root is None:
            return
        listed = 0
        for folder, dirs, files in os.walk(self.media_root):
            dirs.sort()
            for name in sorted(files):
                if Path(name).suffix.lower() not in VIDEO_SUFFIXES:
                    continue
                relative = Path(folder, name).relative_to(self.media_root).as_posix()
                try:
                    self._media_path(relative)
                except ApiError:
                    continue
                yield relative
                listed += 1
                if listed == MAX_LISTED:
                    return


def _file_ref(kind: tuple[str, str], url: str, path: Path) -> VideoRef:
    """A file's reference, keyed by what it is now (``loc3r.identity``: a replaced or
    rewritten file, even with its size and mtime put back, is decoded afresh)."""
    try:
        identity = file_identity(path)
    except (OSError, InputError):
        raise ApiError(404, f"no readable video {url!r}", "video_not_found", "video_url") from None
    return VideoRef((*kind, identity), url, path)
