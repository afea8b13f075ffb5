"""Safe output: files and folders appear whole or not at all, readable as the umask allows,
and a folder is only ever replaced when loc3r wrote all of it; JSON reading with one-line errors.

Output folders (bundles, exports, evaluations) carry a marker, ``.loc3r-output.json``, with
our format, version, the kind of folder, and every file loc3r put in it with its size and
SHA-256 (``later`` names caches that programs add, such as TensorRT's timing cache). A file
that is not listed, or no longer matches its size and digest, is the user's: the folder is
then never replaced or deleted (no name is ours by its prefix alone, and a marker copied
from elsewhere vouches for nothing it does not match). :func:`atomic_directory` builds the
new folder beside the target and swaps it in: the old one is renamed aside, the new one
renamed in, then the old one deleted (Ctrl-C and SIGTERM wait until both renames are done;
a killed run leaves a ``.NAME.loc3r-PID-*`` folder that the next run cleans up or, when the
target itself is missing, renames back: :func:`recover_interrupted`). It refuses a target
that is a symlink, a folder without our marker or with files loc3r did not write, the
current folder, or one that holds it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loc3r.errors import InputError, ModelError

OUTPUT_MARKER = ".loc3r-output.json"
MARKER_FORMAT = "loc3r-output"
MARKER_VERSION = 2  # 2: files with sizes and SHA-256 (1 listed names only, which anything could match)
_STAGING = "loc3r-"  # staging folders are .NAME.loc3r-PID-RANDOM, set aside ones end in .old


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_with_umask(path: Path) -> None:
    """Give ``path`` (and everything under a folder) the permissions a plain ``open`` or
    ``mkdir`` would: 0666 / 0777 less the umask. Libraries that write through temporary
    files (safetensors, tempfile) leave 0600, which another user cannot read."""
    mask = current_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


# -- single files ------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name; it is renamed
    to ``path`` (with the umask's permissions) when the block succeeds, removed otherwise."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        share_with_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; rename it to ``path`` on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as stream:
        yield stream


def finite_json(data: Any, **dump_options: Any) -> str:
    """``data`` as JSON text; NaN and infinities (which JSON cannot hold) become null."""
    return json.dumps(_finite(data), allow_nan=False, **dump_options)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8), atomically."""
    with atomic_file(path) as stream:
        stream.write(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON (non-finite numbers as null), atomically."""
    write_text_atomic(path, finite_json(data, indent=2) + "\n")


def check_output_file(path: Path, flag: str, suffixes: tuple[str, ...], inputs: Iterable[Path] = ()) -> None:
    """Refuse an output file that is a folder, has another extension, or is one of ``inputs``."""
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder", f"pass the path of a {suffixes[0]} file to write")
    if path.suffix.lower() not in suffixes:
        raise InputError(f"{flag} {path} does not end in {' or '.join(suffixes)}", f"name the file to write like out{suffixes[0]}")
    for source in inputs:
        with contextlib.suppress(OSError):
            if path.exists() and path.samefile(source):
                raise InputError(f"{flag} {path} is an input ({source}); it would be overwritten", "choose another file to write")


def check_readable_file(path: Path, what: str) -> None:
    """Refuse in one line a ``what`` that is not a regular file (a FIFO is never opened: that
    would block) or that this user may not read (a permission problem, not a damaged file)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {path} not found", f"check the path to the {what}") from None
    except PermissionError:
        mode = stat.S_IFREG
    if not stat.S_ISREG(mode):
        raise InputError(f"{path} is not a regular file (a folder, FIFO or device)", f"pass the {what} itself")
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))
    except PermissionError:
        raise InputError(
            f"{path}: permission denied (this user cannot read the {what})",
            f"make it readable (chmod u+r {path}) or run as a user who can read it",
        ) from None


# -- output folders ----------------------------------------------------------------------


def check_replaceable(target: str | Path, kind: str, flag: str = "--out") -> Path:
    """``target`` as an absolute path, if loc3r may write a ``kind`` folder there: absent,
    empty, or a ``kind`` folder whose every file loc3r wrote (:func:`foreign_file`).
    Otherwise ``InputError``; a symlink is refused (it would be followed somewhere else)."""
    given = Path(target)
    if given.is_symlink():
        raise InputError(f"{flag} {target} is a symbolic link; loc3r does not write through links", "pass the real folder, or a new one")
    path = given.resolve()
    if path == Path(path.anchor):
        raise InputError(f"{flag} {target} is the root folder", "pass a new folder for the output")
    here = Path.cwd().resolve()
    if here == path or path in here.parents:
        raise InputError(
            f"{flag} {target} is the current folder or holds it, and the output replaces it as a whole",
            "run from another folder, or pass a new folder such as ../out",
        )
    if not path.exists():
        return path
    if not path.is_dir():
        raise InputError(f"{flag} {target} is a file, not a folder", f"pass a new folder for the {kind}")
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return path
    marker = read_marker(path)
    if marker is None:
        raise InputError(
            f"{flag} {target} is a folder loc3r did not write (it holds {entries[0]}); it would be replaced",
            "pass a new or empty folder",
        )
    if marker["kind"] != kind:
        raise InputError(f"{flag} {target} holds loc3r output of kind {marker['kind']!r}, not {kind!r}", "pass a new or empty folder")
    problem = foreign_file(path, marker)
    if problem:
        raise InputError(f"{flag} {target} holds {problem}; replacing the folder would delete it", "move it out, or pass another folder")
    return path


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's output marker, or None when it has no valid one."""
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    valid = (
        isinstance(marker, dict)
        and marker.get("format") == MARKER_FORMAT
        and marker.get("version") == MARKER_VERSION
        and isinstance(marker.get("kind"), str)
        and isinstance(files, dict)
        and all(isinstance(e, dict) and _is_size(e.get("size")) and isinstance(e.get("sha256"), str) for e in files.values())
        and isinstance(marker.get("later"), list)
        and all(isinstance(name, str) and name and "/" not in name for name in marker["later"])
    )
    return marker if valid else None


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def foreign_file(folder: Path, marker: dict[str, Any]) -> str | None:
    """The first file under ``folder`` that loc3r did not write, said in words ("X, which
    loc3r did not write" / "X, which changed since loc3r wrote it"), or None."""
    from loc3r.digest import DigestMemo

    memo = DigestMemo()
    try:
        for item in sorted(folder.rglob("*")):
            relative = item.relative_to(folder).as_posix()
            if relative == OUTPUT_MARKER or relative.split("/", 1)[0] in marker["later"]:
                continue
            if item.is_dir() and not item.is_symlink():
                continue
            entry = marker["files"].get(relative)
            if entry is None or item.is_symlink() or not item.is_file():
                return f"{relative}, which loc3r did not write"
            if item.stat().st_size != entry["size"] or memo.sha256(item) != entry["sha256"]:
                return f"{relative}, which changed since loc3r wrote it"
    finally:
        memo.save()
    return None


def written_files(folder: Path, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every regular file under ``folder`` (or under its entries ``names``)."""
    from loc3r.digest import DigestMemo

    memo = DigestMemo()
    roots = [folder / name for name in names] if names is not None else [folder]
    files: dict[str, dict[str, Any]] = {}
    for root in roots:
        for item in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
            relative = item.relative_to(folder).as_posix()
            if item.is_file() and not item.is_symlink() and relative != OUTPUT_MARKER:
                files[relative] = {"size": item.stat().st_size, "sha256": memo.sha256(item)}
    memo.save()
    return files


def claim_entries(folder: Path, names: Iterable[str]) -> None:
    """Record files written later under ``names`` (engines built on the device, a
    calibration) as loc3r's, with their sizes and digests."""
    marker = read_marker(folder)
    if marker is not None:
        marker["files"] = {**marker["files"], **written_files(folder, list(names))}
        write_json_atomic(folder / OUTPUT_MARKER, marker)


def write_marker(folder: Path, kind: str, later: Iterable[str] = ()) -> None:
    """Mark ``folder`` as a ``kind`` folder whose present files loc3r wrote."""
    marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "kind": kind, "files": written_files(folder), "later": sorted(set(later))}
    write_json_atomic(folder / OUTPUT_MARKER, marker)


@contextmanager
def atomic_directory(target: str | Path, kind: str, later: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it replaces ``target``.

    ``target`` must pass :func:`check_replaceable`. ``later`` names entries that programs
    may add to the finished folder (caches), which still count as loc3r's.
    """
    target = check_replaceable(target, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_STAGING}{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        write_marker(staging, kind, later)
        share_with_umask(staging)
        check_replaceable(target, kind)  # nothing foreign appeared while we worked
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``target`` aside and ``staging`` in (no signal in between), then drop the old."""
    aside = staging.with_name(staging.name + ".old")
    with signals_deferred():
        moved = target.exists()
        if moved:
            os.replace(target, aside)
        try:
            os.replace(staging, target)
        except BaseException:
            if moved:
                os.replace(aside, target)
            raise
    if moved:
        shutil.rmtree(aside, ignore_errors=True)


def clean_stale_staging(target: Path) -> None:
    """Remove staging folders of ``target`` left by runs that were killed; when ``target``
    itself is missing (killed between the two renames), rename its old version back."""
    pattern = re.compile(re.escape(f".{target.name}.{_STAGING}") + r"(\d+)-[^/]*?(\.old)?$")
    for entry in sorted(target.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or _alive(int(match.group(1))):
            continue
        if match.group(2) and not target.exists():
            os.replace(entry, target)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def recover_interrupted(target: str | Path) -> Path | None:
    """When ``target`` is missing because a run was killed between the two renames of
    :func:`atomic_directory`, rename its old version (``.NAME.loc3r-PID-*.old``, with our
    marker, of a process that is gone) back; return where it was, else None."""
    target = Path(target).absolute()
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return None
    pattern = re.compile(re.escape(f".{target.name}.{_STAGING}") + r"(\d+)-[^/]*\.old$")
    for entry in sorted(target.parent.iterdir()):
        match = pattern.match(entry.name)
        if match and not _alive(int(match.group(1))) and entry.is_dir() and read_marker(entry) is not None:
            os.replace(entry, target)
            return entry
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then deliver them (main thread only:
    Python runs signal handlers nowhere else, so other threads are never interrupted)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, _frame: received.append(number)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file holding an object; anything else is a one-line ``ModelError`` ending in ``fix``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})", fix) from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object", fix)
    return data
