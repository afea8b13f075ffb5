"""VGGT in the runtime: whole-clip encoding for files, the sliding window for live sources, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loc3r.models.vggt import VggtCameraEncoder, VggtConfig, random_state_dict
from loc3r.runtime.camera_feed import ClipFeed, StepFeed, camera_feed
from loc3r.runtime.cli import main
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.preprocess import camera_input
from loc3r.runtime.video import iter_frames

FRAMES = 5
SAMPLING = SamplingConfig(max_new_tokens=5)


class RecordingStage:
    """A whole-clip stage over a tiny random VGGT that records the clip lengths it was given."""

    def __init__(self) -> None:
        self.encoder = VggtCameraEncoder(VggtConfig.tiny())
        self.encoder.load_state_dict(random_state_dict(VggtConfig.tiny(), seed=5))
        self.encoder.eval()
        self.calls: list[int] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(images))
        return self.encoder.encode(images)


@pytest.fixture(scope="module")
def stage() -> RecordingStage:
    return RecordingStage()


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return torch.rand(12, 3, 42, 56, generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("v") / "v.mp4", num_frames=16, width=160, height=96)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_pretrained("tiny-vggt")


def test_bounded_feed_encodes_once_when_the_clip_is_complete(stage: RecordingStage, clip: torch.Tensor) -> None:
    stage.calls.clear()
    feed = ClipFeed(stage, live=False, window=4)  # the window only applies to live sources
    assert all(feed.push(frame) == [] for frame in clip[:6])
    assert feed.pending == 6 and stage.calls == []
    tokens = torch.stack(feed.flush())
    assert stage.calls == [6] and feed.pending == 0
    torch.testing.assert_close(tokens, stage.encoder.encode(clip[:6]), rtol=0, atol=0)


def test_live_feed_slides_a_window_and_never_changes_what_it_gave(stage: RecordingStage, clip: torch.Tensor) -> None:
    stage.calls.clear()
    feed = ClipFeed(stage, live=True, window=6, hop=2)
    given: list[torch.Tensor] = []
    for frame in clip[:11]:
        given += feed.push(frame)
    assert stage.calls == [2, 4, 6, 6, 6] and feed.pending == 1
    given += feed.flush()  # a question arrives: the last frame is encoded with its window
    assert stage.calls[-1] == 6 and len(given) == 11
    encode = stage.encoder.encode
    expected = [encode(clip[:2]), encode(clip[:4])[2:], encode(clip[:6])[4:], encode(clip[2:8])[4:],
                encode(clip[4:10])[4:], encode(clip[5:11])[5:]]
    torch.testing.assert_close(torch.stack(given), torch.cat(expected), rtol=0, atol=0)


def test_live_feed_equals_the_whole_clip_within_one_hop(stage: RecordingStage, clip: torch.Tensor) -> None:
    feed = ClipFeed(stage, live=True, window=32, hop=8)
    for frame in clip[:5]:
        assert feed.push(frame) == []
    torch.testing.assert_close(torch.stack(feed.flush()), stage.encoder.encode(clip[:5]), rtol=0, atol=0)


def test_feed_choice_follows_the_stage(pipeline: Pipeline) -> None:
    assert isinstance(camera_feed(pipeline.stages.camera, live=True, window=8), ClipFeed)
    assert isinstance(camera_feed(Pipeline.from_pretrained("tiny").stages.camera, live=False, window=8), StepFeed)
    with pytest.raises(ValueError, match="hop must be within 1..4"):
        ClipFeed(RecordingStage(), live=True, window=4, hop=5)


def test_file_session_holds_the_whole_clip_encoding(pipeline: Pipeline, video: Path) -> None:
    session = pipeline.open(video, FRAMES)
    frames = list(iter_frames(video, FRAMES))
    images = torch.stack([camera_input(f.rgb, pipeline.config) for f in frames])
    assert images.shape[-2:] == (140, 224)  # tiny VGGT: width 224; 96 * 224 / 160 = 134.4 -> 10 patch rows
    model = pipeline.bundle.model
    with torch.inference_mode():
        expected = model.heads.project_camera(model.camera_encoder.encode(images))
    torch.testing.assert_close(session.encoded.stacked()[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert session.encoded.indices == [f.index for f in frames]


def test_streamed_and_reference_order_give_the_same_answer(pipeline: Pipeline, video: Path) -> None:
    pipeline.forget_video()
    streamed = pipeline.open(video, FRAMES, streaming=True).ask("Where am I?", sampling=SAMPLING)
    pipeline.forget_video()
    reference = pipeline.open(video, FRAMES, streaming=False).ask("Where am I?", sampling=SAMPLING)
    assert streamed.token_ids == reference.token_ids
    assert streamed.pose.x == pytest.approx(reference.pose.x, abs=1e-5)
    assert streamed.pose.theta_rad == pytest.approx(reference.pose.theta_rad, abs=1e-5)


def test_live_session_answers_mid_stream_then_keeps_taking_frames(pipeline: Pipeline, video: Path) -> None:
    frames = list(iter_frames(video, 6))
    session = pipeline.new_session("live")
    for frame in frames[:3]:
        session.add_frame(frame)
    first = session.ask("Where am I?", sampling=SAMPLING)
    assert first.video["frames"] == 3
    for frame in frames[3:]:
        session.add_frame(frame)
    session.finish()
    assert session.ask("Where am I?", sampling=SAMPLING).video["frames"] == 6


def test_cli_json_names_the_encoder(video: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(video), "Where am I?", "--json", "--model", "tiny-vggt", "--frames", "4", "--max-new-tokens", "3", "--no-cache"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["encoder_3d"] == "vggt" and out["model"]["id"].startswith("loc3r-tiny-vggt")
    assert out["video"]["frames"] == 4 and out["timings"]["encode_3d"] > 0
