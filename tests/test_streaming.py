"""Streaming runtime: streamed == reference order, encoding cache, bounded prefetch, live input."""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from loc3r.errors import InputError
from loc3r.runtime.demo_video import write_demo_video
from loc3r.models.prompt import build_question_suffix
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.prefetch import prefetched
from loc3r.runtime.sources import live_frames
from loc3r.runtime.video import read_video

FRAMES = 3
SAMPLING = SamplingConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("v") / "v.mp4", num_frames=20, width=160, height=120)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_pretrained("tiny")


def assert_same_answer(a, b, atol: float = 1e-5) -> None:  # noqa: ANN001
    assert a.token_ids == b.token_ids
    for field in ("x", "y", "sigma", "theta_rad"):
        assert getattr(a.pose, field) == pytest.approx(getattr(b.pose, field), abs=atol)


def test_streamed_and_reference_order_give_the_same_answer(pipeline: Pipeline, video: Path) -> None:
    streamed = pipeline.open(video, FRAMES, streaming=True).ask("Where am I?", sampling=SAMPLING)
    pipeline.forget_video()
    reference = pipeline.open(video, FRAMES, streaming=False).ask("Where am I?", sampling=SAMPLING)
    assert_same_answer(streamed, reference)
    assert streamed.video["indices"] == reference.video["indices"]


def test_follow_up_questions_prefill_only_their_own_tokens(
    pipeline: Pipeline, video: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each question runs the LLM over its own tokens and its generated ones only, never the
    video prefix again: every position the decoder processes is counted (a forward pre-hook
    on the Qwen2 model), so a follow-up that re-prefills the prefix fails this test.

    Mutation checked: ``Session.ask`` calling ``self.stages.llm.reset()`` and prefilling
    every frame block again before the question (the prefix re-prefilled on every
    follow-up): the count for each question grows by the prefix's length and this fails.
    """
    session = pipeline.open(video, FRAMES)
    llm = pipeline.stages.llm
    cached = llm.cached_length
    positions: list[int] = []
    decodes: list[int] = []
    hook = llm.model.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: positions.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    decode = llm.decode
    monkeypatch.setattr(llm, "decode", lambda token: (decodes.append(token), decode(token))[1])
    question = build_question_suffix(pipeline.bundle.tokenizer, "Where am I?")
    try:
        answers = []
        for _ in range(2):
            positions.clear()
            decodes.clear()
            answers.append(session.ask("Where am I?", sampling=SAMPLING))
            assert sum(positions) == len(question.ids) + len(decodes)  # the question + one per decoded token
            assert llm.cached_length == cached  # cut back to the video prefix
    finally:
        hook.remove()
    assert cached > 10 * len(question.ids)  # the prefix is long enough for a re-prefill to show
    assert_same_answer(answers[0], answers[1], atol=0)


def test_encoding_cache_skips_decode_and_encode_and_survives_corruption(
    video: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cold = Pipeline.from_pretrained("tiny", cache_dir=tmp_path)
    first = cold.ask(video, "Where am I?", num_frames=FRAMES, sampling=SAMPLING)
    assert first.video["encoding_cache"] == "stored" and first.timings["encode_3d"] > 0
    (entry,) = tmp_path.glob("*.safetensors")

    warm = Pipeline.from_pretrained("tiny", cache_dir=tmp_path)
    second = warm.ask(video, "Where am I?", num_frames=FRAMES, sampling=SAMPLING)
    assert second.video["encoding_cache"] == "hit"
    assert "encode_3d" not in second.timings and "decode" not in second.timings
    assert_same_answer(first, second, atol=0)

    data = bytearray(entry.read_bytes())
    data[-7] ^= 0xFF  # flip bits inside the tensor bytes
    entry.write_bytes(bytes(data))
    third_pipeline = Pipeline.from_pretrained("tiny", cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        third = third_pipeline.ask(video, "Where am I?", num_frames=FRAMES, sampling=SAMPLING)
    assert "is corrupt (checksum mismatch): discarded, recomputing" in caplog.text
    assert third.video["encoding_cache"] == "stored"
    assert_same_answer(first, third, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name, "scenes"]  # no temp files left
    assert [p.name for p in (tmp_path / "scenes").iterdir()] == [f"{entry.stem}.kv.safetensors"]


def test_a_different_frame_count_is_a_different_cache_entry(video: Path, tmp_path: Path) -> None:
    pipeline = Pipeline.from_pretrained("tiny", cache_dir=tmp_path)
    pipeline.open(video, 2)
    pipeline.open(video, 3)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_prefetch_stays_bounded_and_stops_early() -> None:
    produced: list[int] = []

    def numbers():  # noqa: ANN202
        for i in range(1000):
            produced.append(i)
            yield i

    consumed = []
    for item in prefetched(numbers(), depth=3):
        time.sleep(0.01)
        assert len(produced) - len(consumed) <= 3 + 2  # queue + one in hand on each side
        consumed.append(item)
        if item == 20:
            break
    time.sleep(0.1)
    assert len(produced) <= 26
    assert not [t for t in threading.enumerate() if t.name == "loc3r-prefetch"]


def test_prefetch_reraises_producer_errors() -> None:
    def failing():  # noqa: ANN202
        yield 1
        raise InputError("bad frame", "fix it")

    with pytest.raises(InputError, match="bad frame"):
        list(prefetched(failing()))


def raw_frames(count: int, width: int = 64, height: int = 48) -> bytes:
    return b"".join(np.full((height, width, 3), i * 10, dtype=np.uint8).tobytes() for i in range(count))


def test_raw_stdin_frames_with_stride_and_limit() -> None:
    frames = list(live_frames("-", stride=2, max_frames=3, frame_size=(64, 48), fps=10, stdin=io.BytesIO(raw_frames(9))))
    assert [f.index for f in frames] == [0, 2, 4]
    assert [f.timestamp_s for f in frames] == [0.0, 0.2, 0.4]
    assert frames[1].rgb.shape == (48, 64, 3) and int(frames[1].rgb[0, 0, 0]) == 20
    with pytest.raises(InputError, match="stdin ended inside a frame"):
        list(live_frames("-", 1, 5, (64, 48), stdin=io.BytesIO(raw_frames(1) + b"xx")))
    with pytest.raises(InputError, match="--frame-size"):
        list(live_frames("-", 1, 5, None, stdin=io.BytesIO(b"")))


def test_live_session_answers_with_the_frames_so_far(pipeline: Pipeline, video: Path) -> None:
    frames = list(read_video(video, 4).frames)
    from loc3r.runtime.video import Frame

    stream = [Frame(i, i * 0.5, rgb) for i, rgb in enumerate(frames)]
    live = pipeline.new_session("live")
    for frame in stream[:2]:
        live.add_frame(frame)
    early = live.ask("Where am I?", sampling=SAMPLING)
    assert early.video["frames"] == 2
    for frame in stream[2:]:
        live.add_frame(frame)
    late = live.ask("Where am I?", sampling=SAMPLING)
    assert late.video["frames"] == 4 and late.video["duration_s"] == 1.5

    fresh = pipeline.new_session("fresh")
    for frame in stream:
        fresh.add_frame(frame)
    assert_same_answer(late, fresh.ask("Where am I?", sampling=SAMPLING))
