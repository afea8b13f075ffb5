"""What a file is now, so that a changed file is never taken for the one seen before.

A path string names a place, not content: a new file copied onto the same path, or bytes
rewritten in place with the size and mtime put back (``os.utime``), must count as another
file. :func:`file_identity` records the device and inode, the size, ``st_mtime_ns`` and
``st_ctime_ns`` (the status-change time, which the kernel sets on every write and rename
and which no user can set back) and a digest of sampled bytes (the first and last 64 KiB
and evenly spaced blocks between: at most 1 MiB read, so it is cheap on any video). Two
identities are equal only when all of these are; keys built from :meth:`FileIdentity.token`
change when any does.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import astuple, dataclass
from pathlib import Path

from loc3r.errors import InputError

SAMPLE_BLOCK = 1 << 16
SAMPLE_BLOCKS = 16  # blocks read from a file larger than SAMPLE_BLOCK * SAMPLE_BLOCKS


@dataclass(frozen=True)
class FileIdentity:
    """A regular file's identity: where it lives, its stat stamps and a sampled-bytes digest."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    sample: str  # BLAKE2b of the sampled bytes

    def token(self) -> str:
        """A short hex string that changes whenever any field does (for cache keys)."""
        return hashlib.sha256(repr(astuple(self)).encode()).hexdigest()[:32]

    def stamp(self) -> list[object]:
        """The fields as a JSON-friendly list."""
        return list(astuple(self))


def file_identity(path: str | Path) -> FileIdentity:
    """The identity of the regular file at ``path`` (symlinks followed).

    Raises ``FileNotFoundError``/``PermissionError`` as ``open`` does, and ``InputError``
    for something that is not a regular file (a FIFO is never opened for reading, which
    would block)."""
    path = Path(path)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise InputError(f"{path} is not a regular file", "pass a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # replaced between the stat and the open
            raise InputError(f"{path} is not a regular file", "pass a regular file")
        sample = _sampled_digest(fd, info.st_size)
    finally:
        os.close(fd)
    return FileIdentity(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, sample)


def _sampled_digest(fd: int, size: int) -> str:
    """BLAKE2b over blocks of the file: all of it when small, else SAMPLE_BLOCKS spread blocks."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(size.to_bytes(8, "little"))
    if size <= SAMPLE_BLOCK * SAMPLE_BLOCKS:
        offsets: list[int] = list(range(0, size, SAMPLE_BLOCK))
    else:
        last = size - SAMPLE_BLOCK
        offsets = [last * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)]
    for offset in offsets:
        digest.update(os.pread(fd, SAMPLE_BLOCK, offset))
    return digest.hexdigest()
