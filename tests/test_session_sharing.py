"""Sessions sharing one pipeline's LLM cache: a session refills it from its encoded frames
(``reclaim_cache``), and a token callback that raises leaves the cache as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.video import iter_frames

SAMPLING = SamplingConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_pretrained("tiny")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sharing")
    return (write_demo_video(root / "a.mp4", num_frames=12, width=96, height=64),
            write_demo_video(root / "b.mp4", num_frames=9, width=96, height=64))


def assert_same(a, b) -> None:  # noqa: ANN001 - Answers
    assert a.token_ids == b.token_ids
    for name in ("x", "y", "sigma", "theta_rad"):
        assert getattr(a.pose, name) == pytest.approx(getattr(b.pose, name), abs=1e-5)


def test_a_session_reclaims_the_cache_after_another_used_it(pipeline: Pipeline, videos: tuple[Path, Path]) -> None:
    first = pipeline.open(videos[0], 3)
    before = first.ask("Where am I?", sampling=SAMPLING)
    prefix = pipeline.stages.llm.cached_length
    pipeline.forget_video()
    pipeline.open(videos[1], 2).ask("Where am I?", sampling=SAMPLING)
    first.reclaim_cache()
    assert pipeline.stages.llm.cached_length == prefix
    assert_same(first.ask("Where am I?", sampling=SAMPLING), before)


def test_a_live_session_reclaims_without_its_time_text_and_keeps_growing(pipeline: Pipeline, videos: tuple[Path, Path]) -> None:
    frames = list(iter_frames(videos[0], 4))
    live = pipeline.new_session("live")
    for frame in frames[:2]:
        live.add_frame(frame)
    live.ask("Where am I?", sampling=SAMPLING)
    blocks_only = pipeline.stages.llm.cached_length  # the live time text is cut back after each answer
    pipeline.forget_video()
    pipeline.open(videos[1], 2)
    live.reclaim_cache()
    assert pipeline.stages.llm.cached_length == blocks_only
    for frame in frames[2:]:
        live.add_frame(frame)
    grown = live.ask("Where am I?", sampling=SAMPLING)

    pipeline.forget_video()
    fresh = pipeline.new_session("live")
    for frame in frames:
        fresh.add_frame(frame)
    assert_same(grown, fresh.ask("Where am I?", sampling=SAMPLING))


def test_a_raising_token_callback_leaves_the_cache_as_it_was(pipeline: Pipeline, videos: tuple[Path, Path]) -> None:
    session = pipeline.open(videos[0], 3)
    expected = session.ask("What is on my left?", sampling=SAMPLING)
    prefix = pipeline.stages.llm.cached_length
    seen: list[int] = []

    def stop_after_two(token: int) -> None:
        seen.append(token)
        if len(seen) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C, or a server's client gone

    with pytest.raises(KeyboardInterrupt):
        session.ask("What is on my left?", sampling=SamplingConfig(max_new_tokens=20), on_token=stop_after_two)
    assert pipeline.stages.llm.cached_length == prefix
    assert_same(session.ask("What is on my left?", sampling=SAMPLING), expected)
