"""SHA-256 of files, remembered in the user's cache so that large artifacts are hashed once.

The memo never lives beside the files it vouches for: a folder that arrives with its own
memo (copied, downloaded, forged) could claim any digest. Entries sit in
``$LOC3R_HOME/cache/digests.json``, keyed on each file's identity (``loc3r.identity``:
device, inode, size, mtime, ctime and a digest of sampled bytes), so bytes rewritten with
the size and mtime put back are hashed again (the ctime, which no user can set, moved).
A memo file that cannot be read or written is simply ignored: files are then hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from loc3r.fileio import write_json_atomic
from loc3r.identity import FileIdentity, file_identity

MEMO_FILE = "digests.json"
MAX_ENTRIES = 20_000  # oldest entries dropped beyond this
_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    """SHA-256 of ``path``'s bytes (streamed)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def default_memo_path() -> Path:
    """``$LOC3R_HOME/cache/digests.json``."""
    from loc3r.models.tiny import loc3r_home

    return loc3r_home() / "cache" / MEMO_FILE


class DigestMemo:
    """Remembered digests of files, keyed on their identities (in the user's cache)."""

    def __init__(self, memo_path: Path | None = None) -> None:
        self.path = memo_path or default_memo_path()
        self._changed = False
        try:
            memo = json.loads(self.path.read_text(encoding="utf-8"))
            known = memo if isinstance(memo, dict) else {}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            known = {}
        self._known: dict[str, str] = {k: v for k, v in known.items() if isinstance(v, str)}

    def sha256(self, path: Path) -> str:
        """The SHA-256 of ``path``, from the memo while the file's identity is unchanged."""
        return self.remember([path], "sha256", lambda: file_sha256(path))

    def remember(self, paths: Sequence[Path], what: str, compute: Callable[[], str]) -> str:
        """``compute()`` (a digest of ``paths``' contents named ``what``), remembered for as
        long as every path keeps its identity; not remembered if one changed meanwhile."""
        before = [file_identity(p) for p in paths]
        key = _key(before, what)
        known = self._known.get(key)
        if known is not None:
            return known
        value = compute()
        if [file_identity(p) for p in paths] == before:
            self._known.pop(key, None)
            self._known[key] = value
            self._changed = True
        return value

    def save(self) -> None:
        """Write the memo back (an unwritable cache is simply not used)."""
        if not self._changed:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:  # entries added by other processes meanwhile are kept
                on_disk = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError, RecursionError):
                on_disk = {}
            merged = {**(on_disk if isinstance(on_disk, dict) else {}), **self._known}
            write_json_atomic(self.path, dict(list(merged.items())[-MAX_ENTRIES:]))
        self._changed = False


def _key(identities: list[FileIdentity], what: str) -> str:
    return hashlib.sha256(json.dumps([what, *(i.stamp() for i in identities)]).encode()).hexdigest()[:40]
