"""Shared command-line behaviour: one-line errors, exit codes, no tracebacks unless --debug.

Exit codes: 0 success; 2 bad usage or input (``InputError``/``ModelError``, argparse errors,
a path the user named that cannot be written: permission denied, read-only file system);
1 internal faults and a full disk (``InternalError``, ``ENOSPC``/``EDQUOT``, any other
exception); 130 Ctrl-C, 143 SIGTERM (both raised as ``KeyboardInterrupt`` so that every
``finally`` cleans up); 141 when the reader of stdout went away (``| head``), silently.
Every failure is one line, ``prog: error: problem: fix`` (a preflight check that finds several
problems prints one such line each); loc3r's own warnings (a truncated
video, a discarded cache entry) are ``prog: warning: ...`` lines.
"""

from __future__ import annotations

import argparse
import errno
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from typing import NoReturn

from loc3r.errors import InputError, InternalError, Loc3rError, RandomWeightsWarning

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_BROKEN_PIPE = 141
EXIT_USAGE = 2

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that cleanup runs."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated


def shows_default(action: argparse.Action) -> bool:
    """An option whose default is worth showing (not absent, off, empty or suppressed; 0 is shown)."""
    default = action.default
    return bool(action.option_strings) and default is not None and default is not False and default not in ("", [], argparse.SUPPRESS)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default (unless its text already says it, or it has none);
    in a description or epilog, paragraphs whose lines are indented are shown as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = text.split("\n\n")
        return "\n\n".join(
            "\n".join(indent + line for line in part.splitlines())
            if any(line.startswith("  ") for line in part.splitlines())
            else super(DefaultsHelpFormatter, self)._fill_text(part, width, indent)
            for part in paragraphs
        )

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not shows_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ... (see prog --help)``), exit 2, and
    the defaults in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - argparse's own
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:  # noqa: ANN002, ANN003 - argparse's own
        action = super().add_argument(*args, **kwargs)
        if action.help is None and shows_default(action):
            action.help = "(default: %(default)s)"  # an option without text still shows its default
        return action

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def os_error(exc: OSError) -> Loc3rError | None:
    """The one-line error for a full disk or an unusable path; None for other OSErrors.

    Disk full -> exit 1 (the environment, not the input, is at fault); permission denied
    or a read-only file system -> exit 2 (the user named a path they cannot use).
    """
    where = _where(exc)
    if exc.errno in _DISK_FULL:
        return InternalError(
            f"the disk is full ({os.strerror(exc.errno)}){f' writing in {where}' if where else ''}",
            "free some space or choose a folder on another disk, then run again",
        )
    if exc.errno in _NOT_WRITABLE or isinstance(exc, PermissionError):
        reason = os.strerror(exc.errno) if exc.errno else "Permission denied"
        return InputError(
            f"cannot access {where or 'a file'} ({reason})",
            "fix its permissions or choose another path (e.g. a folder you can write to), then run again",
        )
    return None


def _where(exc: OSError) -> str:
    """The path of the failing call, or its closest existing folder when it is gone (the
    temporary names of atomic writes are removed by the time the error is shown)."""
    if not isinstance(exc.filename, (str, bytes, os.PathLike)) or not exc.filename:
        return ""
    path = os.fsdecode(exc.filename)
    shown = path
    while not os.path.exists(shown) and os.path.dirname(shown) not in ("", shown):
        shown = os.path.dirname(shown)
    return shown if os.path.exists(shown) else path


class _WarningLine(logging.Handler):
    """loc3r's own warnings as ``prog: warning: ...`` lines on the current stderr."""

    def __init__(self, prog: str) -> None:
        super().__init__(logging.WARNING)
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{self.prog}: warning: {record.getMessage()}", file=sys.stderr)


def quiet_import_noise() -> None:
    """Silence warnings libraries log while being imported (torchao's optional CUDA kernels
    that fail to load, torch's pytree deprecations); ``--debug`` keeps them."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def run_cli(prog: str, body: Callable[[], int], debug: bool) -> int:
    """Run ``body``; turn every failure into ``prog: error: ...`` on stderr and an exit code."""
    if not debug:
        quiet_import_noise()
    warning_lines = _WarningLine(prog)
    logging.getLogger("loc3r").addHandler(warning_lines)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        with warnings.catch_warnings():  # the tools mark random weights in their own output (NOTE lines, JSON, banner)
            warnings.filterwarnings("ignore", category=RandomWeightsWarning)
            return _run(prog, body, debug)
    finally:
        logging.getLogger("loc3r").removeHandler(warning_lines)
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(prog: str, body: Callable[[], int], debug: bool) -> int:
    try:
        return body()
    except Loc3rError as exc:
        return _report(prog, exc, debug)
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        mapped = os_error(exc)
        if mapped is not None:
            return _report(prog, mapped, debug)
        return _internal(prog, exc, debug)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        return _internal(prog, exc, debug)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a native panic (pyo3's PanicException) is one line too
        return _internal(prog, exc, debug)


def _silence_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone, and the flush at exit must not fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _report(prog: str, exc: Loc3rError, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    for line in exc.lines():
        print(f"{prog}: error: {line}", file=sys.stderr)
    return exc.exit_code


def _internal(prog: str, exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    detail = str(exc).splitlines()[0] if str(exc) else ""
    print(
        f"{prog}: internal error: {type(exc).__name__}: {detail} (rerun with --debug for the traceback)",
        file=sys.stderr,
    )
    return 1
