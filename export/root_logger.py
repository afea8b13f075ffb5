"""onnxruntime's quantization modules configure the root logger (``basicConfig`` at import,
a level per call): ``kept_root_logger`` puts its handlers and level back afterwards."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def kept_root_logger(level: int | None = None) -> Iterator[None]:
    """The root logger's handlers and level as they were on entry, restored on exit; ``level``
    (e.g. ``logging.ERROR``) applies inside, to quiet the quantizer's per-call warnings."""
    root = logging.getLogger()
    handlers, previous = list(root.handlers), root.level
    if level is not None:
        root.setLevel(level)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(previous)
