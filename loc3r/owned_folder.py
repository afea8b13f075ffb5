"""A folder that loc3r adds to across runs (``loc3r-eval --out``), under the output rule of
``loc3r.fileio``: its marker records every file loc3r wrote with size and SHA-256.

Before any work, :func:`open_owned_folder` refuses a symlinked folder, a non-empty folder
without our marker (or with another kind's), and any file that loc3r did not write or that
changed since. Files are then written whole (:meth:`OwnedFolder.write_text`) or appended
line by line (:meth:`OwnedFolder.appender`): after every line the marker records the
digest of everything written so far, so a resumed run reads exactly what loc3r wrote. Bytes
beyond the recorded end (a run killed between a line and its record) are dropped by writing
the file anew, never by truncating it in place; anything else that differs is refused.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from loc3r.digest import file_sha256
from loc3r.errors import InputError
from loc3r.fileio import (
    MARKER_FORMAT,
    MARKER_VERSION,
    OUTPUT_MARKER,
    read_marker,
    write_json_atomic,
    write_text_atomic,
)

_FIX = "pass another --out to start afresh"


@dataclass
class OwnedFolder:
    path: Path
    marker: dict

    def write_text(self, name: str, text: str) -> Path:
        """Write ``name`` whole (atomically) and record it."""
        self.check_own(name)
        data = text.encode("utf-8")
        write_text_atomic(self.path / name, text)
        self._record(name, len(data), hashlib.sha256(data).hexdigest())
        return self.path / name

    def claim(self, name: str) -> None:
        """Record ``name``, just written by another writer (e.g. a plot), as loc3r's."""
        path = self.path / name
        self._record(name, path.stat().st_size, file_sha256(path))

    def check_own(self, name: str) -> None:
        """Refuse to overwrite ``name`` unless loc3r wrote it and it is unchanged."""
        path = self.path / name
        if not (path.exists() or path.is_symlink()):
            return
        entry = self.marker["files"].get(name)
        if entry is None or path.is_symlink() or not path.is_file():
            raise InputError(f"--out {self.path} holds {name}, which loc3r did not write; it would be overwritten", "move it out, or " + _FIX)
        if path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            raise InputError(f"--out {self.path} holds {name}, which changed since loc3r wrote it; it would be overwritten", "move it out, or " + _FIX)

    @contextmanager
    def appender(self, name: str) -> Iterator[IO[str]]:
        """A text stream whose every ``write`` of whole lines is appended, flushed and recorded."""
        path = self.path / name
        digest = hashlib.sha256()
        if path.exists():
            with path.open("rb") as existing:
                for block in iter(lambda: existing.read(1 << 20), b""):
                    digest.update(block)
        with path.open("a", encoding="utf-8") as stream:
            yield _RecordingStream(self, name, stream, digest)

    def _record(self, name: str, size: int, sha256: str) -> None:
        self.marker["files"][name] = {"size": size, "sha256": sha256}
        write_json_atomic(self.path / OUTPUT_MARKER, self.marker)


class _RecordingStream:
    def __init__(self, folder: OwnedFolder, name: str, stream: IO[str], digest: Any) -> None:
        self.folder, self.name, self.stream, self.digest = folder, name, stream, digest

    def write(self, text: str) -> int:
        data = text.encode("utf-8")
        self.stream.write(text)
        self.stream.flush()
        self.digest.update(data)
        self.folder._record(self.name, self.stream.tell(), self.digest.hexdigest())
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def open_owned_folder(folder: str | Path, kind: str, logs: tuple[str, ...] = (), prog: str = "loc3r") -> OwnedFolder:
    """The folder, created if absent, once every file in it is one loc3r wrote. ``logs``
    are append-only files: their recorded prefix must match; bytes beyond it are dropped
    (rewritten without them, with a note on stderr)."""
    path = Path(folder)
    if path.is_symlink():
        raise InputError(f"--out {folder} is a symbolic link; loc3r does not write through links", "pass the real folder, or a new one")
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {folder} is a file, not a folder", "pass a folder for the output")
    path.mkdir(parents=True, exist_ok=True)
    entries = sorted(entry.name for entry in path.iterdir())
    marker = read_marker(path)
    if marker is None:
        if entries:
            raise InputError(f"--out {folder} is a folder loc3r did not write (it holds {entries[0]})", "pass a new or empty folder")
        marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "kind": kind, "files": {}, "later": []}
        write_json_atomic(path / OUTPUT_MARKER, marker)
    elif marker["kind"] != kind:
        raise InputError(f"--out {folder} holds loc3r output of kind {marker['kind']!r}, not {kind!r}", "pass a new or empty folder")
    owned = OwnedFolder(path, marker)
    for item in sorted(path.rglob("*")):
        name = item.relative_to(path).as_posix()
        if name == OUTPUT_MARKER:
            continue
        if name in logs and name in marker["files"] and item.is_file() and not item.is_symlink():
            _check_log(owned, name, prog)
        else:
            owned.check_own(name)
    return owned


def _check_log(owned: OwnedFolder, name: str, prog: str) -> None:
    """The log's recorded prefix is unchanged; a tail beyond it is written away."""
    path, entry = owned.path / name, owned.marker["files"][name]
    data = path.read_bytes()
    head = data[: entry["size"]]
    if len(head) < entry["size"] or hashlib.sha256(head).hexdigest() != entry["sha256"]:
        raise InputError(f"--out {owned.path} holds {name}, which changed since loc3r wrote it (it cannot be resumed)", _FIX)
    if len(data) > len(head):
        write_text_atomic(path, head.decode("utf-8"))
        print(f"{prog}: dropped {len(data) - len(head)} bytes at the end of {path} that no finished item recorded", file=sys.stderr)
