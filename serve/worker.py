"""The model's one worker thread: questions queue up (bounded), are answered one at a
time, and stream their tokens back to the event loop of the request that asked.

A full queue is a 429 with ``Retry-After`` (the mean time one question has taken); a
question whose client went away is skipped, or stopped at its next token (the runtime
cuts the KV cache back all the same). Questions on the video already in the LLM cache go
first, within a fairness bound (:class:`WaitingQuestions`). Between questions the worker
feeds live sources.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from loc3r.errors import InputError, Loc3rError, QuestionFailed, question_failed
from loc3r.models.prompt import build_question_suffix, build_video_prefix
from loc3r.models.vision import vision_tokens_per_frame
from loc3r.runtime.generate import SamplingConfig, TextStream
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.result import Answer
from loc3r.runtime.session import VideoSession
from loc3r.serve.errors import ApiError
from loc3r.serve.live import LiveFeed
from loc3r.serve.media import VideoRef
from loc3r.serve.metrics import ServeMetrics
from loc3r.runtime.scene_store import KVLayout, Scene
from loc3r.serve.sessions import SessionStore
from loc3r.serve.settings import ServeSettings

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.05  # how often an idle worker with live sources looks for new frames
MAX_RESTARTS = 3  # a model thread that keeps dying is reported dead, not restarted forever


class GenerationCancelled(Exception):
    """Raised from the token callback when the client is gone."""


@dataclass
class Question:
    """One chat completion: what to answer, and where to send tokens and the result."""

    ref: VideoRef
    text: str
    situation: str
    sampling: SamplingConfig
    frames: int
    return_bev: bool  # add the layout map's points to the response
    streaming: bool  # send each token as it comes (else only the result)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]]
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived_at: float = field(default_factory=time.perf_counter)
    passed_over: int = 0  # questions on the cached video served before this one, though later
    min_confidence: float | None = None  # below it, the answer says "not localized"
    confidence_radius: float = 1.0  # metres, for min_confidence
    situations: list[str] | None = None  # POST /v1/locate: poses of these, no answer
    scene_source: str | None = None  # where a reclaimed video's prefix came from (memory, store, prefill)

    def emit(self, kind: str, payload: Any) -> None:
        """Hand ``("token", text) | ("progress", (frames done, total)) | ("done", Result) | ("error", exc)``
        to the request (thread-safe); progress and tokens only to streamed questions."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    @property
    def session_key(self) -> Hashable:
        return self.ref.key if self.ref.live else (self.ref.key, self.frames)


class WaitingQuestions:
    """A bounded queue that serves questions on the video in the LLM cache first.

    Taking the oldest question whose session is ``prefer`` saves a prefill of another
    video's prefix per question (clients asking about different videos would otherwise
    alternate). Fairness stays bounded: a question passed over ``max_passes`` times is
    served next, whatever video it is on.
    """

    def __init__(self, capacity: int, max_passes: int) -> None:
        self.capacity, self.max_passes = capacity, max_passes
        self._waiting: deque[Question] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._waiting)

    def put_nowait(self, question: Question) -> None:
        with self._ready:
            if len(self._waiting) >= self.capacity:
                raise queue.Full
            self._waiting.append(question)
            self._ready.notify()

    def take_all(self) -> list[Question]:
        """Empty the queue; the questions that were waiting."""
        with self._ready:
            taken = list(self._waiting)
            self._waiting.clear()
            return taken

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def get(self, prefer: Hashable | None, timeout: float | None) -> Question | None:
        """The next question (None once closed); ``queue.Empty`` after ``timeout`` seconds."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._waiting or self._closed, timeout):
                raise queue.Empty
            if self._closed:
                return None
            if prefer is not None and self._waiting[0].passed_over < self.max_passes:
                for position, question in enumerate(self._waiting):
                    if question.session_key == prefer:
                        for earlier in islice(self._waiting, position):
                            earlier.passed_over += 1
                        del self._waiting[position]
                        return question
            return self._waiting.popleft()


@dataclass
class Result:
    answer: Answer
    video_url: str
    prompt_tokens: int
    server: dict[str, Any]  # queue_wait_s, ttft_s, session: opened | kept | reclaimed


@dataclass
class Located:
    """The poses of ``POST /v1/locate``."""

    poses: list[dict[str, Any]]
    scene: str
    video: dict[str, Any]
    server: dict[str, Any]  # queue_wait_s, locate_s, total_s, session, scene_source


class ModelWorker:
    """Owns the pipeline; every model call happens on its thread."""

    def __init__(self, pipeline: Pipeline, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.metrics = metrics
        self.sessions = SessionStore(settings.session_memory_bytes, settings.scene_memory_bytes, self._load_scene, self._spill_scene)
        self.feeds: dict[str, LiveFeed] = {}
        self._queue = WaitingQuestions(settings.queue_size, settings.max_passes)
        self._mean_service_s = 1.0
        self._thread = self._new_thread()
        self._stopping = False
        self._current: Question | None = None  # the question being answered
        self._progress_at = time.monotonic()  # when the current question last moved (started, a token)
        self.restarts = 0
        self.last_failure: str | None = None  # why the model thread last stopped

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name="loc3r-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def health(self) -> dict[str, Any]:
        """The model thread as it is: ``ok``, ``stuck`` (a question has not moved for
        ``stuck_after_s``) or ``dead`` (stopped, and restarted ``MAX_RESTARTS`` times already)."""
        self.revive()
        current = self._current
        still = time.monotonic() - self._progress_at if current is not None else 0.0
        status = "dead" if not self._thread.is_alive() else "stuck" if still > self.settings.stuck_after_s else "ok"
        return {"status": status, "busy_s": round(still, 3), "restarts": self.restarts, "last_failure": self.last_failure}

    def revive(self) -> None:
        """Start a new model thread if the last one ended without handing over (see ``_run``)."""
        if self._thread.ident is not None and not self._thread.is_alive():
            self._replace()

    def _replace(self) -> None:
        """A new model thread takes the queue over; once ``MAX_RESTARTS`` are spent, the waiting
        questions are told the model is gone (nobody waits for a thread that will not come)."""
        if self._stopping:
            return
        if self.restarts >= MAX_RESTARTS:
            for question in self._queue.take_all():
                question.emit("error", self._unavailable())
            return
        self.restarts += 1
        log.error("started a new model thread (restart %d of %d)", self.restarts, MAX_RESTARTS)
        self.sessions.resident = None  # the LLM cache may be half-written
        self._thread = self._new_thread()
        self._thread.start()

    def _unavailable(self) -> ApiError:
        return ApiError(503, f"the model has stopped ({self.last_failure}); restart the server", "model_unavailable")

    def stop(self, wait_s: float = 30.0) -> None:
        """Stop: the question being answered is cancelled (at its next token), the queue
        closed, and the model thread waited for at most ``wait_s``."""
        self._stopping = True
        current = self._current
        if current is not None:
            current.cancelled.set()
        for feed in self.feeds.values():
            feed.stop()
        self._queue.close()
        self._thread.join(timeout=wait_s)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, question: Question) -> None:
        """Queue ``question``, or refuse it with a 429 when the queue is full (a 503 when the
        model thread is dead)."""
        self.revive()
        if self._thread.ident is not None and not self._thread.is_alive():
            raise self._unavailable()
        try:
            self._queue.put_nowait(question)
        except queue.Full:
            self.metrics.rejected.inc()
            retry = max(1, math.ceil(self._mean_service_s))
            raise ApiError(
                429, f"the server is busy ({self.settings.queue_size} questions waiting); retry in {retry} s",
                "queue_full", headers={"Retry-After": str(retry)},
            ) from None
        self.metrics.queue_depth.set(self.waiting)

    # -- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - an exit raised inside a question (or a fault here) ends this thread only
            self.last_failure = f"{type(exc).__name__}: {one_line(exc)}".rstrip(": ")
            log.error("the model thread stopped: %s", self.last_failure)
            self._replace()  # at once: questions already waiting are not left to hang

    def _loop(self) -> None:
        while True:
            try:
                question = self._queue.get(self.sessions.resident_key, IDLE_POLL_S if self.feeds else None)
            except queue.Empty:
                self._feed_live()
                continue
            if question is None:
                return
            self.metrics.queue_depth.set(self.waiting)
            started = time.perf_counter()
            self._serve(question)
            self._mean_service_s = 0.8 * self._mean_service_s + 0.2 * (time.perf_counter() - started)

    def _serve(self, question: Question) -> None:
        waited = time.perf_counter() - question.arrived_at
        self.metrics.queue_wait.observe(waited)
        if question.cancelled.is_set():
            self.metrics.cancelled.inc()
            return
        self._current, self._progress_at = question, time.monotonic()
        try:
            result = self._answer(question, waited)
        except GenerationCancelled:
            self.metrics.cancelled.inc()
            return
        except ApiError as exc:
            question.emit("error", exc)
            return
        except InputError as exc:
            question.emit("error", ApiError.from_input(exc))
            return
        except QuestionFailed as exc:  # a native panic (crafted text): one line in the log, a 500 to the client
            log.error("question failed: %s", exc)
            self.sessions.resident = None
            question.emit("error", ApiError(500, str(exc), "question_failed"))
            return
        except Exception as exc:  # noqa: BLE001 - the request gets a 500; the worker goes on
            log.exception("question failed")
            self.sessions.resident = None  # the LLM cache may be half-written: refill before reuse
            question.emit("error", exc)
            return
        except (KeyboardInterrupt, SystemExit):  # ends the thread (``revive`` starts another): this question is told
            question.emit("error", ApiError(500, "the model stopped while answering this question; ask again", "model_restarted"))
            raise
        except BaseException as exc:  # noqa: BLE001 - e.g. a panic outside the session's own guard
            log.error("question failed: %s", question_failed(exc))
            self.sessions.resident = None
            question.emit("error", ApiError(500, str(question_failed(exc)), "question_failed"))
            return
        finally:
            self._current = None
        finished = time.perf_counter() - question.arrived_at
        self.metrics.duration.observe(finished)
        question.emit("done", result)

    def _answer(self, question: Question, waited: float) -> Result | Located:
        session, how = self._session(question)
        if question.situations is not None:
            return self._locate(session, how, question, waited)
        text = TextStream(self.pipeline.bundle.tokenizer)
        first_token: list[float] = []

        def on_token(token: int) -> None:
            if question.cancelled.is_set():
                raise GenerationCancelled
            self._progress_at = time.monotonic()
            self.metrics.tokens.inc()
            if not first_token:
                first_token.append(time.perf_counter())
                self.metrics.ttft.observe(first_token[0] - question.arrived_at)
            delta = text.push(token) if question.streaming else ""
            if delta:
                question.emit("token", delta)

        # TTFT from the request's arrival: an opened or reclaimed video is part of the wait
        answer = session.ask(question.text, question.situation, question.sampling, on_token, given_at=question.arrived_at)
        answer = answer.require_confidence(question.min_confidence, question.confidence_radius)
        done = first_token[0] if first_token else time.perf_counter()  # a stop token first: the answer is empty
        if not first_token:
            self.metrics.ttft.observe(done - question.arrived_at)
        server = {"queue_wait_s": round(waited, 6), "ttft_s": round(done - question.arrived_at, 6), "session": how,
                  **({"scene_source": question.scene_source} if question.scene_source else {})}
        return Result(answer, question.ref.url, self._prompt_tokens(session, question), server)

    def _locate(self, session: VideoSession, how: str, question: Question, waited: float) -> Located:
        """Every situation's pose over the video's KV (batched where the LLM allows), no answer."""
        from loc3r.runtime.confidence import not_localized_reason
        from loc3r.runtime.result import pose_record

        start = time.perf_counter()
        poses = session.locate(question.situations)
        done = time.perf_counter()
        items = []
        judged = question.min_confidence is not None
        for situation, pose in zip(question.situations, poses, strict=True):
            reason = not_localized_reason(pose.confidence, question.min_confidence, question.confidence_radius) if judged else None
            items.append({"situation": situation, **pose_record(pose, self.pipeline.model_info, reason, judged)})  # as answers
        server = {"queue_wait_s": round(waited, 6), "locate_s": round(done - start, 6), "total_s": round(done - question.arrived_at, 6),
                  "session": how, **({"scene_source": question.scene_source} if question.scene_source else {})}
        return Located(items, question.ref.url, session.describe(), server)

    def _session(self, question: Question) -> tuple[VideoSession, str]:
        """The question's video in the LLM cache: kept, reclaimed (refilled) or opened."""
        key = question.session_key
        session = self.sessions.get(key)
        if session is not None:
            source = self._make_resident(session)
            how = "kept" if source is None else "reclaimed"
            if source is not None:
                question.scene_source = source
        else:
            self.sessions.prepare_open()  # opening a video resets the LLM cache
            if question.ref.live:
                session = self.pipeline.new_session(question.ref.url, with_bev=True)
            else:

                def progress(done: int, total: int) -> None:  # an encoded frame is progress: /health is not "stuck" while a long video encodes
                    self._progress_at = time.monotonic()
                    if question.streaming:
                        question.emit("progress", (done, total))

                session = self.pipeline.open(question.ref.path, question.frames, with_bev=True, on_frame=progress)
            self.pipeline.forget_video()  # the store, not the pipeline, keeps sessions
            self.metrics.evictions.inc(self.sessions.add(key, session, pinned=self._live_keys()))
            how = "opened"
            if question.ref.live:
                self._start_feed(question.ref.live)
        self._update_gauges()
        if question.ref.live:
            self._feed_session(question.ref.live, session)
        return session, how

    # -- live sources -----------------------------------------------------------------------

    def _start_feed(self, name: str) -> None:
        if name in self.feeds:
            self.feeds[name].stop()  # its session was evicted after the source ended: read it again
        self.feeds[name] = LiveFeed(name, self.settings.live_sources[name], self.settings.live_stride, self.settings.max_frames)

    def _live_keys(self) -> frozenset[Hashable]:
        """Sessions of sources still delivering frames: never evicted."""
        return frozenset(("live", name) for name, feed in self.feeds.items() if not feed.finished)

    def _feed_session(self, name: str, session: VideoSession) -> None:
        """Encode the frames that arrived; raise the source's error when it failed empty."""
        feed = self.feeds[name]
        frames = feed.take()
        if frames or (feed.finished and session.duration_s is None and session.num_frames):
            self._make_resident(session)
            for frame in frames:
                session.add_frame(frame)
            if feed.finished and session.num_frames:
                session.finish()
        if feed.error is not None and not session.num_frames:  # the reason (its URL, a network error) stays in the log
            raise ApiError(502, f"live source {name} could not be read (the server's log says why)", "live_source_failed")
        if not session.num_frames:
            message = f"live source {name} has not delivered a frame yet; ask again shortly"
            raise ApiError(503, message, "live_source_warming_up", headers={"Retry-After": "1"})

    def _feed_live(self) -> None:
        """Idle time: encode what live sources delivered, so questions find it done."""
        for name, feed in self.feeds.items():
            session = self.sessions.get(("live", name))
            if session is None or session.duration_s is not None:
                continue
            try:
                self._feed_session(name, session)
            except (ApiError, Loc3rError):
                continue  # reported to the next question on this source
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001 - the worker must survive a frame it cannot encode (a native panic too)
                log.exception("live source %s: a frame could not be encoded", name)
                self.sessions.resident = None  # the LLM cache may be half-written
        self._update_gauges()

    # -- bookkeeping ----------------------------------------------------------------------

    def _make_resident(self, session: VideoSession) -> str | None:
        source = self.sessions.make_resident(session)
        if source is not None:
            self.metrics.reclaims.inc()
            self.metrics.scene_sources.labels(source).inc()
        return source

    def _load_scene(self, session: VideoSession) -> Scene | None:
        """A session's stored scene (the pipeline's scene store), None without one."""
        store = self.pipeline.scenes
        if store is None or session.store_key is None:
            return None
        return store.load(session.store_key, KVLayout(*self.pipeline.stages.llm.kv_layout))

    def _spill_scene(self, session: VideoSession, scene: Scene) -> None:
        """A scene leaving memory goes to the scene store unless it is there already."""
        store = self.pipeline.scenes
        if store is not None and session.store_key is not None and not store.path(session.store_key).is_file():
            store.store(session.store_key, scene)

    def _prompt_tokens(self, session: VideoSession, question: Question) -> int:
        tokenizer, config = self.pipeline.bundle.tokenizer, self.pipeline.config
        video = session.describe()
        prefix = build_video_prefix(
            tokenizer, len(session.encoded.blocks), vision_tokens_per_frame(config), float(video["duration_s"]), session.encoded.timestamps_s
        )
        return prefix.length + len(build_question_suffix(tokenizer, question.text, question.situation).ids)

    def scenes(self) -> dict[str, Any]:
        """The resident scenes' KV budget and what it holds (for /health)."""
        store = self.pipeline.scenes
        return {
            "memory_budget_bytes": self.sessions.kv_budget_bytes, "memory_bytes": self.sessions.kv_bytes(),
            "resident": self.sessions.resident_scenes(), "reclaimed_from": dict(self.sessions.sources),
            "store": None if store is None else {"root": str(store.root), "budget_bytes": store.budget_bytes},
        }

    def _update_gauges(self) -> None:
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.session_bytes.set(self.sessions.total_bytes())
        self.metrics.scene_memory_budget.set(self.sessions.kv_budget_bytes)
        self.metrics.scene_memory_bytes.set(self.sessions.kv_bytes())
        self.metrics.scenes_resident.set(len(self.sessions.resident_scenes()))


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
