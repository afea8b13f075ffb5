"""Safe output: files and folders appear whole or not at all, readable as the umask allows,
and a folder is only ever replaced when loc3r wrote all of it; JSON reading with one-line errors.

Output folders (bundles, exports) carry a marker, ``.loc3r-output.json``, with our format,
version, the kind of folder and the names loc3r put in it. :func:`atomic_directory` builds
the new folder beside the target and swaps it in: the old one is renamed aside, the new one
renamed in, then the old one deleted (Ctrl-C and SIGTERM wait until both renames are done;
a killed run leaves a ``.NAME.loc3r-PID-*`` folder that the next run cleans up or, when the
target itself is missing, renames back). It refuses to replace a folder without our
marker, one holding names loc3r did not write, the current folder, or one that holds it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loc3r.errors import InputError, ModelError

OUTPUT_MARKER = ".loc3r-output.json"
MARKER_FORMAT = "loc3r-output"
MARKER_VERSION = 1
OWN_PREFIX = ".loc3r-"  # hidden files loc3r keeps in its folders (marker, digest memos)
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


# -- output folders ----------------------------------------------------------------------


def check_replaceable(target: str | Path, kind: str, flag: str = "--out") -> Path:
    """``target`` as an absolute path, if loc3r may write a ``kind`` folder there: absent,
    empty, or a ``kind`` folder loc3r wrote that holds nothing else. Otherwise ``InputError``."""
    path = Path(target).resolve()  # a symlinked folder is replaced where it really is
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
    foreign = [name for name in entries if name not in marker["entries"] and not name.startswith(OWN_PREFIX)]
    if foreign:
        raise InputError(
            f"{flag} {target} holds {foreign[0]}, which loc3r did not write; replacing the folder would delete it",
            "move it out, or pass another folder",
        )
    return path


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's output marker, or None when it has no valid one."""
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    valid = (
        isinstance(marker, dict)
        and marker.get("format") == MARKER_FORMAT
        and marker.get("version") == MARKER_VERSION
        and isinstance(marker.get("kind"), str)
        and isinstance(marker.get("entries"), list)
        and all(isinstance(name, str) for name in marker["entries"])
    )
    return marker if valid else None


def claim_entries(folder: Path, names: Iterable[str]) -> None:
    """Record ``names`` (written later, e.g. engines built on the device) as loc3r's."""
    marker = read_marker(folder)
    if marker is not None:
        marker["entries"] = sorted({*marker["entries"], *names})
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
        entries = sorted({*(entry.name for entry in staging.iterdir()), *later})
        marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "kind": kind, "entries": entries}
        (staging / OUTPUT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
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
