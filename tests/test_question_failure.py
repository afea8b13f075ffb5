"""One bad question must not take the model down: a real Rust panic (a tokenizer whose
pre-tokenizer regex backtracks past Oniguruma's limit on a crafted question, raised through
pyo3 as ``PanicException``, a ``BaseException``) followed by a normal question, on the same
Pipeline, the same server and in loc3r-run; a model thread that dies or sticks; top-p at its
extreme."""

from __future__ import annotations

import io
import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from serve_helpers import chat_body

from loc3r.errors import QuestionFailed
from loc3r.models.tiny import resolve_model
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig, pick_token
from loc3r.runtime.cli import main as run_main
from loc3r.runtime.pipeline import Pipeline
from loc3r.serve.server import build_server, running
from loc3r.serve.settings import ServeSettings
from loc3r.serve.worker import MAX_RESTARTS

CRAFTED = "a" * 40 + "c"  # (a+)+b against it exceeds Oniguruma's retry limit: the tokenizer panics
FRAMES = 2
SAMPLING = SamplingConfig(max_new_tokens=4)


@pytest.fixture(scope="module")
def panicky_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with a pathological split in front of its pre-tokenizer (ordinary
    text tokenizes exactly as before: the split never matches it)."""
    bundle = tmp_path_factory.mktemp("panicky") / "bundle"
    shutil.copytree(resolve_model("tiny"), bundle)
    tokenizer = json.loads((bundle / "tokenizer.json").read_text(encoding="utf-8"))
    split = {"type": "Split", "pattern": {"Regex": "(a+)+b"}, "behavior": "Isolated", "invert": False}
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, tokenizer["pre_tokenizer"]]}
    (bundle / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    return bundle


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("video") / "room.mp4", num_frames=6, width=96, height=72)


@pytest.fixture(scope="module")
def reference(video: Path) -> list[int]:
    """The answer of the unmodified tiny model: what a normal question must still get."""
    pipeline = Pipeline.from_pretrained("tiny")
    return pipeline.ask(video, "Where am I?", sampling=SAMPLING, num_frames=FRAMES).token_ids


def test_the_crafted_question_really_panics_in_rust(panicky_bundle: Path) -> None:
    """The control: the failure under test is a genuine pyo3 PanicException, a BaseException."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(panicky_bundle / "tokenizer.json"))
    with pytest.raises(BaseException) as caught:  # noqa: PT011 - the class lives in pyo3_runtime, made at run time
        tokenizer.encode(CRAFTED)
    assert type(caught.value).__name__ == "PanicException" and not isinstance(caught.value, Exception)


def test_a_panicking_question_then_a_normal_one_on_the_same_pipeline(panicky_bundle: Path, video: Path, reference: list[int]) -> None:
    pipeline = Pipeline.from_pretrained(panicky_bundle)
    with pytest.raises(QuestionFailed, match=r"^this question could not be answered \(PanicException: .*retry-limit"):
        pipeline.ask(video, CRAFTED, sampling=SAMPLING, num_frames=FRAMES)
    answer = pipeline.ask(video, "Where am I?", sampling=SAMPLING, num_frames=FRAMES)
    assert answer.token_ids == reference  # the held video and its LLM cache are whole


def test_a_failure_inside_the_model_leaves_the_video_cache_whole(video: Path, reference: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """A panic after the question's prefill (in the heads): the cache is cut back to the video."""
    pipeline = Pipeline.from_pretrained("tiny")
    session = pipeline.open(video, FRAMES)
    video_length = pipeline.stages.llm.cached_length
    panic = panic_class()

    def heads_panic(*_: object) -> None:
        raise panic("called `Option::unwrap()` on a `None` value")

    with monkeypatch.context() as patched:
        patched.setattr(pipeline.stages.heads, "pose", heads_panic)
        with pytest.raises(QuestionFailed, match="PanicException"):
            session.ask("Where am I?", sampling=SAMPLING)
    assert pipeline.stages.llm.cached_length == video_length
    assert session.ask("Where am I?", sampling=SAMPLING).token_ids == reference


def panic_class() -> type[BaseException]:
    """pyo3's PanicException (made by pyo3 at run time: obtained from a real panic)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(a+)+b"), "isolated")
    try:
        tokenizer.encode(CRAFTED)
    except BaseException as exc:  # noqa: BLE001 - that is the point
        return type(exc)
    raise AssertionError("the pathological regex did not panic")


# -- the server -------------------------------------------------------------------------------------


def post(url: str, question: str) -> httpx.Response:
    body = chat_body("room.mp4", question, max_tokens=SAMPLING.max_new_tokens, loc3r={"frames": FRAMES})
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def answer_ids(response: httpx.Response, pipeline: Pipeline) -> list[int]:
    assert response.status_code == 200, response.text
    return pipeline.bundle.tokenizer.encode(response.json()["choices"][0]["message"]["content"])


@pytest.fixture
def served(panicky_bundle: Path, video: Path, tmp_path: Path):  # noqa: ANN201 - yields (url, server)
    pipeline = Pipeline.from_pretrained(panicky_bundle)
    server = build_server(pipeline, ServeSettings(media_dir=video.parent, upload_dir=tmp_path / "uploads", max_frames=FRAMES, stuck_after_s=0.5))
    with running(server) as url:
        yield url, server


def test_a_panicking_question_then_a_normal_one_on_the_same_server(served, reference: list[int], caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    url, server = served
    pipeline = server.worker.pipeline
    normal = answer_ids(post(url, "Where am I?"), pipeline)
    for stream in (False, True):
        body = chat_body("room.mp4", CRAFTED, max_tokens=4, loc3r={"frames": FRAMES}, stream=stream)
        failed = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        if stream:  # the 200 went out before the question failed: the error is an event
            event = json.loads(failed.text.split("data:", 2)[2].strip())
        else:
            assert failed.status_code == 500
            event = failed.json()
        assert event["error"]["code"] == "question_failed"
        assert event["error"]["message"].startswith("this question could not be answered (PanicException: ")
    assert answer_ids(post(url, "Where am I?"), pipeline) == normal == reference  # the same worker, still serving
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["worker"] == {"status": "ok", "busy_s": 0.0, "restarts": 0, "last_failure": None}
    assert not [r for r in caplog.records if r.exc_info]  # one line in the log, no traceback


def test_a_dead_model_thread_is_restarted_and_said(served, reference: list[int], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    url, server = served
    heads = server.worker.pipeline.stages.heads
    real_pose = heads.pose
    monkeypatch.setattr(heads, "pose", lambda *_: sys.exit("a library called sys.exit"))
    failed = post(url, "Where am I?")
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "model_restarted"
    monkeypatch.setattr(heads, "pose", real_pose)
    health = httpx.get(f"{url}/health", timeout=10).json()  # finds the thread dead, starts another
    assert health["worker"]["restarts"] == 1 and health["worker"]["last_failure"] == "SystemExit: a library called sys.exit"
    assert health["status"] == "ok"
    assert answer_ids(post(url, "Where am I?"), server.worker.pipeline) == reference

    server.worker.restarts = MAX_RESTARTS  # the budget spent: the next death is final
    release = threading.Event()

    def exit_later(*_: object) -> None:
        release.wait(30)
        sys.exit("again")

    monkeypatch.setattr(heads, "pose", exit_later)
    with ThreadPoolExecutor(2) as pool:
        dying = pool.submit(post, url, "Where am I?")
        time.sleep(0.5)
        waiting = pool.submit(post, url, "Where am I?")  # queued behind the question that kills the thread
        time.sleep(0.5)
        release.set()
        assert dying.result().json()["error"]["code"] == "model_restarted"
        assert waiting.result().status_code == 503 and waiting.result().json()["error"]["code"] == "model_unavailable"  # told, not left to hang
    dead = httpx.get(f"{url}/health", timeout=10)
    assert dead.status_code == 503 and dead.json()["status"] == "dead"
    refused = post(url, "Where am I?")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"


def test_a_stuck_model_thread_is_reported(served, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    url, server = served
    heads = server.worker.pipeline.stages.heads
    real_pose, release = heads.pose, threading.Event()

    def hang(*args: object) -> object:
        release.wait(30)
        return real_pose(*args)

    monkeypatch.setattr(heads, "pose", hang)
    asking = threading.Thread(target=post, args=(url, "Where am I?"))
    asking.start()
    try:
        time.sleep(1.5)  # past stuck_after_s = 0.5 without a token
        stuck = httpx.get(f"{url}/health", timeout=10)
        assert stuck.status_code == 503 and stuck.json()["status"] == "stuck" and stuck.json()["worker"]["busy_s"] >= 0.5
    finally:
        release.set()
        asking.join(60)
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


# -- loc3r-run ---------------------------------------------------------------------------------------------


def test_loc3r_run_reports_a_panicking_question_in_one_line(
    panicky_bundle: Path, video: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUST_BACKTRACE", "1")  # the worst case: Rust would print a whole backtrace on file descriptor 2
    assert run_main([str(video), CRAFTED, "--model", str(panicky_bundle), "--frames", str(FRAMES), "--no-cache", "--json"]) == 1
    err = capfd.readouterr().err  # what reached file descriptor 2, native writes included
    assert err.count("\n") == 1, err  # no Rust backtrace, no Python traceback
    assert err.startswith("loc3r-run: error: this question could not be answered (PanicException: Onig: Regex search error: ")


def test_loc3r_run_interactive_answers_the_next_question(
    panicky_bundle: Path, video: Path, reference: list[int], capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUST_BACKTRACE", "1")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{CRAFTED}\nWhere am I?\n"))
    argv = [str(video), "-i", "--model", str(panicky_bundle), "--frames", str(FRAMES), "--no-cache", "--json"]
    assert run_main([*argv, "--max-new-tokens", str(SAMPLING.max_new_tokens)]) == 0
    captured = capfd.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line.lower() or "panic" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("loc3r-run: error: this question could not be answered (PanicException"), captured.err
    assert "Traceback" not in captured.err and "panicked at" not in captured.err
    answers = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert [a["question"] for a in answers] == ["Where am I?"] and answers[0]["answer_token_ids"] == reference


# -- sampling --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("top_p", "temperature"), [(1e-300, 2.0), (5e-324, 100.0), (1e-45, 0.01), (1.0, 100.0)])
def test_top_p_at_its_extremes_never_reaches_nan(top_p: float, temperature: float) -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, -1e4, float("-inf")] + [0.5] * 50)
    generator = np.random.default_rng(0)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p)
    picks = {pick_token(logits, sampling, generator) for _ in range(50)}
    if top_p < 1e-30:
        assert picks == {0}  # the nucleus is the most likely token alone
    else:
        assert picks <= set(range(len(logits))) - {4}


def test_health_is_ok_while_a_long_video_encodes_frame_by_frame(video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoded frame is progress (a question not streamed included): only a question that does
    not move for stuck_after_s is "stuck", not one whose video takes long to encode."""
    from loc3r.runtime.session import VideoSession

    frames, per_frame_s, stuck_after_s = 8, 0.25, 0.6  # the encoding lasts 2 s, over three times stuck_after_s
    real_add, added = VideoSession.add_frame, []

    def slow_add(self: VideoSession, frame: object) -> None:
        time.sleep(per_frame_s)
        real_add(self, frame)
        added.append(frame)

    monkeypatch.setattr(VideoSession, "add_frame", slow_add)
    pipeline = Pipeline.from_pretrained("tiny")
    settings = ServeSettings(media_dir=video.parent, upload_dir=tmp_path / "uploads", max_frames=frames, stuck_after_s=stuck_after_s)
    with running(build_server(pipeline, settings)) as url:
        body = chat_body("room.mp4", "Where am I?", max_tokens=2, loc3r={"frames": frames})  # not streamed: no progress events
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=60)
            seen = []
            while len(added) < frames - 1:  # while the video encodes (what follows its last frame is not under test)
                seen.append(httpx.get(f"{url}/health", timeout=10).json()["worker"])
                time.sleep(0.1)
            assert asked.result().status_code == 200
    busy = [worker for worker in seen if worker["busy_s"] > 0]
    assert len(busy) >= 5, seen  # the health checks ran while the video encoded
    assert all(worker["status"] == "ok" for worker in seen), " ".join(f"{w['status']}:{w['busy_s']}" for w in seen)


def test_a_chunk_that_cannot_be_made_ends_the_stream_with_an_error_event(served, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """After the 200, a failure building the last chunk is the stream's last event, not a cut connection."""
    url, _ = served

    def broken(*_: object) -> None:
        raise ValueError("cannot build the extension")

    monkeypatch.setattr("loc3r.serve.app.loc3r_extension", broken)
    body = chat_body("room.mp4", "Where am I?", max_tokens=2, loc3r={"frames": FRAMES}, stream=True)
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    last = json.loads(response.text.strip().rsplit("data:", 1)[1])
    assert last["error"]["code"] == "internal_error" and last["error"]["message"] == "internal error: ValueError: cannot build the extension"
    assert post(url, "Where am I?").status_code == 200  # the server goes on


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("temperature", [0.0, 0.01, 1.0, 100.0])
@pytest.mark.parametrize(
    ("logits", "picks"),
    [
        ([1.0, INF, 2.0, INF], {1, 3}),  # an FP16 engine's overflow: the overflowed tokens alone
        ([INF, -INF, 5.0], {0}),
        ([65504.0, 65504.0, -65504.0], {0, 1}),  # FP16's largest: finite, no overflow in float64
    ],
)
def test_infinite_logits_never_reach_nan(logits: list[float], picks: set[int], temperature: float) -> None:
    generator = np.random.default_rng(0)
    sampling = SamplingConfig(temperature=temperature, top_p=0.9)
    got = {pick_token(torch.tensor(logits, dtype=torch.float16), sampling, generator) for _ in range(40)}
    assert got <= picks
    if temperature >= 1.0:
        assert got == picks  # sampled: every candidate comes up in 40 draws (p = 1/2 each)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(("logits", "problem"), [([NAN, 1.0, 2.0], "the model's next-token logits hold NaN"), ([-INF, -INF], "every next token probability 0")])
def test_nan_or_all_impossible_logits_are_an_error_not_a_token(logits: list[float], problem: str, temperature: float) -> None:
    from loc3r.errors import InternalError

    with pytest.raises(InternalError, match=problem):
        pick_token(torch.tensor(logits), SamplingConfig(temperature=temperature), np.random.default_rng(0))
