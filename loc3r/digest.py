"""SHA-256 of files, remembered per folder so that large artifacts are hashed once.

A folder's memo, ``.loc3r-digests.json``, maps each file's path (relative to the folder)
to the size and mtime it had when hashed, with the digest. A file whose stat no
longer matches is hashed again; a memo that cannot be read or written is simply ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from loc3r.fileio import write_json_atomic

DIGEST_MEMO = ".loc3r-digests.json"
_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    """SHA-256 of ``path``'s bytes (streamed)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class DigestMemo:
    """Remembered SHA-256 digests of the files under one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._changed = False
        try:
            memo = json.loads((folder / DIGEST_MEMO).read_text(encoding="utf-8"))
            self._known: dict[str, list[object]] = memo if isinstance(memo, dict) else {}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            self._known = {}

    def sha256(self, relative: str) -> str:
        """The digest of ``folder / relative``, from the memo while its stat is unchanged."""
        path = self.folder / relative
        info = path.stat()
        stamp = [info.st_size, info.st_mtime_ns]
        known = self._known.get(relative)
        if isinstance(known, list) and len(known) == 3 and known[:2] == stamp and isinstance(known[2], str):
            return known[2]
        digest = file_sha256(path)
        self._known[relative] = [*stamp, digest]
        self._changed = True
        return digest

    def save(self) -> None:
        """Write the memo back (a read-only folder is simply not memoised)."""
        if self._changed:
            with contextlib.suppress(OSError):
                write_json_atomic(self.folder / DIGEST_MEMO, self._known)
            self._changed = False
