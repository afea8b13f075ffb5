"""The video prefill of finished frame blocks on a worker thread, while the encoders go on.

On GPU targets the encoders (TensorRT, on the ``Device`` stream) and the LLM
(onnxruntime-gpu, on its own CUDA stream) can run at once: a block is handed over once its
camera and vision encodings are host arrays (the encoder stream synchronized), so block
k's prefill waits only for block k's encodings, never for block k+1's. Blocks are
prefilled one job at a time, in the order given (the KV cache is causal), so the cache is
exactly the sequential path's.

An error in a prefill is kept and raised by every later ``submit`` and ``drain`` (the
blocks after it are skipped: the prefix would have a hole), so it reaches the caller as
the question's error; ``drain`` never waits for a worker that has stopped.

Unverified on hardware: no GPU in this project; the ordering is tested with fakes.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Job = TypeVar("Job")


class OrderedWorker(Generic[Job]):
    """Runs ``work(job)`` for each submitted job, in order, on one short-lived thread (started
    when a job arrives, ended when none is left)."""

    def __init__(self, work: Callable[[Job], None], name: str = "loc3r-prefill") -> None:
        self._work = work
        self._name = name
        self._jobs: collections.deque[Job] = collections.deque()
        self._busy = threading.Condition()
        self._pending = 0  # submitted, not yet finished (or skipped)
        self._running = False
        self._error: BaseException | None = None

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished."""
        with self._busy:
            return self._pending

    def submit(self, job: Job) -> None:
        """Queue ``job`` behind the earlier ones; raises a previous job's error instead."""
        with self._busy:
            self._raise_failure()
            self._jobs.append(job)
            self._pending += 1
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name=self._name, daemon=True).start()

    def drain(self) -> None:
        """Wait until every submitted job has finished; raises the first job's error, if any."""
        with self._busy:
            self._busy.wait_for(lambda: self._pending == 0)
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._busy:
                if not self._jobs:
                    self._running = False
                    return
                job = self._jobs.popleft()
                failed = self._error is not None
            try:
                if not failed:
                    self._work(job)
            except BaseException as error:  # noqa: BLE001 - handed to the caller by submit/drain
                with self._busy:
                    self._error = error
            finally:
                with self._busy:
                    self._pending -= 1
                    self._busy.notify_all()
