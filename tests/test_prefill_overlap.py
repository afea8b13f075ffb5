"""The video prefill of finished frame blocks on a worker (GPU targets' overlap), on CPU fakes:
its order against the encoders, a cache bit-identical to the sequential path's, errors
that reach the question instead of hanging. Unverified on hardware (no GPU here)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from loc3r.models.bundle import load_bundle
from loc3r.models.layout import vision_tokens_per_frame
from loc3r.models.prompt import build_question_suffix
from loc3r.models.tiny import resolve_model
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.overlap import OrderedWorker
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.session import VISION_BATCH, Stages, VideoSession
from loc3r.runtime.stages import PrefillResult
from loc3r.runtime.torch_backend import torch_stages
from loc3r.runtime.video import Frame

FRAMES = VISION_BATCH + 2  # a full vision batch and a last, short one
WAIT_S = 20.0


def frames(count: int) -> list[Frame]:
    rng = np.random.default_rng(4)
    return [Frame(i, 0.5 * i, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for i in range(count)]


@pytest.fixture(scope="module")
def bundle():  # noqa: ANN201 - Bundle
    return load_bundle(resolve_model("tiny"))


class Log:
    """An ordered, thread-safe record of what each stage did, like events recorded on streams."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self._lock = threading.Lock()

    def add(self, entry: str) -> None:
        with self._lock:
            self.entries.append(entry)

    def index(self, entry: str) -> int:
        return self.entries.index(entry)


class LoggedVision:
    """The vision stage, logging each batch's end; batch ``hold`` does not finish until the
    prefill of batch ``hold - 1`` has started (so it passes only if the two overlap)."""

    def __init__(self, inner, log: Log, prefill_started: dict[int, threading.Event], hold: int | None) -> None:  # noqa: ANN001
        self.inner, self.log, self.prefill_started, self.hold = inner, log, prefill_started, hold
        self.batches = 0

    def encode(self, pixels):  # noqa: ANN001, ANN201
        batch, self.batches = self.batches, self.batches + 1
        tokens = self.inner.encode(pixels)
        if batch == self.hold:
            assert self.prefill_started[batch - 1].wait(WAIT_S), "the previous block's prefill did not start while this batch encoded"
        self.log.add(f"encode {batch} end")
        return tokens

    def video_end(self):  # noqa: ANN201
        return self.inner.video_end()


class LoggedLLM:
    """The LLM stage, logging each prefill call's start and end and failing the ``fail_at``-th;
    its chunk holds a whole vision batch of frame blocks, so prefill call k is batch k's."""

    def __init__(self, inner, log: Log, prefill_started: dict[int, threading.Event], block_tokens: int, fail_at: int | None = None) -> None:  # noqa: ANN001
        self.inner, self.log, self.prefill_started, self.fail_at = inner, log, prefill_started, fail_at
        self.chunk_tokens = VISION_BATCH * block_tokens
        self.calls = 0
        self.threads: set[str] = set()

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else as the real stage
        return getattr(self.inner, name)

    def prefill(self, embeds) -> PrefillResult:  # noqa: ANN001
        call, self.calls = self.calls, self.calls + 1
        self.threads.add(threading.current_thread().name)
        self.log.add(f"prefill {call} start")
        if call in self.prefill_started:
            self.prefill_started[call].set()
        if call == self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        result = self.inner.prefill(embeds)
        self.log.add(f"prefill {call} end")
        return result


def session_over(bundle, overlap: bool, hold: int | None = None, fail_at: int | None = None) -> tuple[VideoSession, Log, LoggedLLM]:  # noqa: ANN001
    log, started = Log(), {k: threading.Event() for k in range(4)}
    camera, vision, heads, llm = torch_stages(bundle)
    logged_llm = LoggedLLM(llm, log, started, 1 + vision_tokens_per_frame(bundle.config), fail_at)
    stages = Stages(camera, LoggedVision(vision, log, started, hold), heads, logged_llm, overlap_prefill=overlap)
    pipeline = Pipeline(bundle, stages, "torch")
    return pipeline.new_session("frames", live=False), log, logged_llm


def test_a_block_is_prefilled_after_its_encodings_and_while_the_next_are_encoded(bundle) -> None:  # noqa: ANN001
    """Prefill call k holds vision batch k's blocks: it starts after batch k's encodings end,
    and batch 1 cannot end before prefill 0 has started."""
    session, log, llm = session_over(bundle, overlap=True, hold=1)
    for frame in frames(FRAMES):
        session.add_frame(frame)
    session.finish(10.0)
    for k in range(2):
        assert log.index(f"encode {k} end") < log.index(f"prefill {k} start")
    assert log.index("prefill 0 start") < log.index("encode 1 end")
    assert "loc3r-prefill" in llm.threads and session.num_frames == FRAMES == len(session.encoded.blocks)


def test_in_line_prefill_keeps_the_sequential_order(bundle) -> None:  # noqa: ANN001
    session, log, llm = session_over(bundle, overlap=False)
    for frame in frames(FRAMES):
        session.add_frame(frame)
    session.finish(10.0)
    assert log.entries[:6] == ["encode 0 end", "prefill 0 start", "prefill 0 end", "encode 1 end", "prefill 1 start", "prefill 1 end"]
    assert "loc3r-prefill" not in llm.threads


def test_the_overlapped_cache_and_logits_equal_the_sequential_ones_exactly(bundle) -> None:  # noqa: ANN001
    results = {}
    for overlap in (False, True):
        session, _, _ = session_over(bundle, overlap)
        for frame in frames(FRAMES):
            session.add_frame(frame)
        session.finish(10.0)
        kv = session.stages.llm.read_kv()
        answer = session.ask("Where am I?", sampling=SamplingConfig(max_new_tokens=4))
        suffix = build_question_suffix(bundle.tokenizer, "Where is the door?")
        logits = session.stages.llm.prefill(session.stages.llm.embed(suffix.ids)).last_logits
        results[overlap] = (kv, answer, np.asarray(logits))
    (kv_a, answer_a, logits_a), (kv_b, answer_b, logits_b) = results[False], results[True]
    assert len(kv_a) == len(kv_b) and all(np.array_equal(a, b) for a, b in zip(kv_a, kv_b, strict=True))
    assert np.array_equal(logits_a, logits_b)
    assert answer_a.token_ids == answer_b.token_ids and answer_a.pose == answer_b.pose


def test_a_prefill_error_is_the_questions_error_and_never_hangs(bundle) -> None:  # noqa: ANN001
    session, log, _ = session_over(bundle, overlap=True, fail_at=1)
    outcome: list[BaseException | None] = []

    def feed_and_ask() -> None:
        try:
            for frame in frames(FRAMES):
                session.add_frame(frame)
            session.ask("Where am I?", sampling=SamplingConfig(max_new_tokens=2))
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - what the caller gets
            outcome.append(error)

    caller = threading.Thread(target=feed_and_ask)
    caller.start()
    caller.join(WAIT_S)
    assert not caller.is_alive(), "the session hung on a failed prefill"
    assert isinstance(outcome[0], RuntimeError) and str(outcome[0]) == "CUDA error: an illegal memory access was encountered"
    assert "prefill 2 start" not in log.entries  # the blocks after the failed one are not prefilled: the prefix has a hole
    with pytest.raises(RuntimeError, match="illegal memory access"):  # every later question: same error, no hang
        session.ask("Where am I?", sampling=SamplingConfig(max_new_tokens=2))


def test_the_ordered_worker_runs_jobs_in_order_and_ends_its_thread() -> None:
    done: list[int] = []

    def work(job: int) -> None:
        time.sleep(0.001 * (5 - job))  # later jobs are quicker: order is kept anyway
        done.append(job)

    worker: OrderedWorker[int] = OrderedWorker(work, name="test-ordered-worker")
    for job in range(5):
        worker.submit(job)
    worker.drain()
    assert done == [0, 1, 2, 3, 4] and worker.pending == 0
    deadline = time.monotonic() + WAIT_S
    while any(t.name == "test-ordered-worker" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "test-ordered-worker" for t in threading.enumerate())

