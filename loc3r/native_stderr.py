"""What native code writes to stderr while it runs on a user's text.

A Rust panic (the ``tokenizers`` pre-tokenizer's regex on a crafted question) prints its
message, and with ``RUST_BACKTRACE`` set a whole backtrace, straight to file descriptor 2
before pyo3 raises ``PanicException``. The command-line tools promise one line per error,
so such output is held while the call runs: written out unchanged when the call returns,
logged at debug level when it raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import BinaryIO

log = logging.getLogger(__name__)
STDERR_FD = 2
_lock = threading.Lock()  # one redirection of the process's fd 2 at a time
_held: list[BinaryIO] = []  # one reused file, made on first use


@contextlib.contextmanager
def held_stderr() -> Iterator[None]:
    """Hold fd 2's output for the block (see the module's note); a no-op without an fd 2."""
    with _lock:
        try:
            saved = os.dup(STDERR_FD)
        except OSError:
            yield
            return
        if not _held:
            _held.append(tempfile.TemporaryFile())
        held = _held[0]
        held.seek(0)
        held.truncate()
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()  # Python's own buffered text goes out before, in order
        os.dup2(held.fileno(), STDERR_FD)
        raised = False
        try:
            yield
        except BaseException:
            raised = True
            raise
        finally:
            os.dup2(saved, STDERR_FD)
            os.close(saved)
            held.seek(0)
            output = held.read()
            if output and raised:
                log.debug("native output of the failed call: %s", output.decode(errors="replace"))
            elif output:
                os.write(STDERR_FD, output)
