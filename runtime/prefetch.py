"""Run an iterator in a background thread behind a bounded queue (decode while encoding)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


@dataclass
class _Failure:
    error: BaseException


def prefetched(items: Iterator[Any], depth: int = 4, transform: Callable[[Any], T] | None = None) -> Iterator[T]:
    """Yield ``items`` (each passed through ``transform`` first, in the worker) while a
    worker thread produces up to ``depth`` ahead.

    Memory stays bounded by ``depth`` items. An exception in the producer is re-raised in
    the consumer; leaving the loop early (break, error, Ctrl-C) stops the producer promptly
    and closes ``items``.
    """
    slots: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item if transform is None else transform(item)):
                    return
            put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put(_Failure(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="loc3r-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join(timeout=5)
