"""End to end on the tiny model: video in, answer + pose out, prefix reuse, token layout."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loc3r.runtime.cli import main
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.preprocess import cut3r_input, siglip_input
from loc3r.runtime.video import read_video

FRAMES = 3


@pytest.fixture(scope="module")
def demo_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("video") / "demo.mp4", num_frames=24, width=160, height=120)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_pretrained("tiny")


def test_frame_blocks_hold_camera_token_then_vision_tokens(pipeline: Pipeline, demo_video: Path) -> None:
    session = pipeline.open(demo_video, FRAMES)
    blocks = session.encoded.stacked()
    model = pipeline.bundle.model
    assert blocks.shape == (FRAMES, 1 + 210, model.config.llm.hidden_size)
    video = read_video(demo_video, FRAMES)
    assert session.encoded.indices == video.indices
    with torch.inference_mode():
        images = torch.stack([cut3r_input(rgb, pipeline.config.cut3r_long_side) for rgb in video.frames])
        camera = model.heads.project_camera(model.camera_encoder.encode(images))
        vision = model.vision.encode(siglip_input(video.frames))
    torch.testing.assert_close(blocks[:, 0], camera, rtol=0, atol=1e-5)
    torch.testing.assert_close(blocks[:, 1:], vision, rtol=0, atol=1e-5)


def test_prefix_reuse_gives_the_tokens_of_a_fresh_run(pipeline: Pipeline, demo_video: Path) -> None:
    sampling = SamplingConfig(max_new_tokens=6)
    first = pipeline.ask(demo_video, "What is in front of me?", num_frames=FRAMES, sampling=sampling)
    second = pipeline.ask(demo_video, "Where am I?", num_frames=FRAMES, sampling=sampling)
    fresh = Pipeline.from_pretrained("tiny").ask(demo_video, "Where am I?", num_frames=FRAMES, sampling=sampling)
    assert second.token_ids == fresh.token_ids
    for a, b in [(second.pose.x, fresh.pose.x), (second.pose.sigma, fresh.pose.sigma), (second.pose.theta_rad, fresh.pose.theta_rad)]:
        assert a == pytest.approx(b, abs=1e-5)
    # <Pos>/<Ori> precede the question: the pose depends on video and situation only
    assert first.pose.x == pytest.approx(second.pose.x, abs=1e-6)
    situated = pipeline.ask(demo_video, "Where am I?", "I face the door.", sampling, num_frames=FRAMES)
    assert situated.pose.x != pytest.approx(second.pose.x, abs=1e-6)


def test_json_output_has_answer_pose_timings_and_random_weight_flag(
    demo_video: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(demo_video), "Where am I?", "--json", "--model", "tiny", "--frames", str(FRAMES), "--max-new-tokens", "5"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"answer", "position", "orientation", "timings", "model", "video"}
    assert set(out["position"]) == {"x", "y", "sigma", "confidence"} and out["position"]["sigma"] > 0
    assert out["position"]["confidence"] is None and out["confidence_note"].startswith("no calibration for this bundle")
    assert "localized" not in out  # only with --min-confidence
    assert out["orientation"]["theta_deg"] == pytest.approx(math.degrees(out["orientation"]["theta_rad"]))
    assert abs(out["orientation"]["theta_rad"]) <= math.pi
    assert out["model"]["random_weights"] is True and out["model"]["encoder_3d"] == "cut3r"
    assert "RANDOM weights" in out["warning"]
    assert out["video"]["frames"] == FRAMES
    for stage in ("decode", "encode_3d", "encode_vision", "prefill_video", "prefill_question", "ttft_s"):
        assert stage in out["timings"]


VIDEO_STAGES = ("cache_read", "decode", "preprocess", "encode_3d", "encode_vision", "prefill_video", "scene_load", "scene_store")


def test_ttft_of_a_question_given_with_a_file_includes_the_video_it_waited_for(
    demo_video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOC3R_HOME", str(tmp_path))  # an empty encoding cache: the first run encodes
    argv = [str(demo_video), "Where am I?", "What is here?", "--json", "--frames", str(FRAMES), "--max-new-tokens", "2"]
    for run in ("encoded", "cache hit"):
        assert main(argv) == 0
        first, follow_up = (json.loads(line)["timings"] for line in capsys.readouterr().out.splitlines())
        waited = sum(first.get(stage, 0.0) for stage in VIDEO_STAGES)
        expected = ("decode", "encode_3d", "encode_vision", "prefill_video", "scene_store") if run == "encoded" else ("cache_read", "scene_load")
        assert all(first[stage] > 0 for stage in expected), run
        assert first["ttft_s"] >= first["video_s"] >= waited, run
        assert first["ttft_s"] == pytest.approx(first["video_s"] + first["question_to_first_token_s"], abs=2e-6)
        assert first["question_to_first_token_s"] >= first["prefill_question"]
        # the follow-up waited for no video stage: its TTFT is its own
        assert not set(VIDEO_STAGES) & set(follow_up)
        assert follow_up["ttft_s"] == pytest.approx(follow_up["video_s"] + follow_up["question_to_first_token_s"], abs=2e-6)


def test_a_question_on_a_prepared_video_counts_from_the_question(pipeline: Pipeline, demo_video: Path) -> None:
    session = pipeline.open(demo_video, FRAMES)
    answer = session.ask("Where am I?", sampling=SamplingConfig(max_new_tokens=1))
    assert not set(VIDEO_STAGES) & set(answer.timings)
    pipeline.forget_video()
    asked = pipeline.ask(demo_video, "Where am I?", sampling=SamplingConfig(max_new_tokens=1), num_frames=FRAMES)
    assert asked.timings["ttft_s"] >= asked.timings["video_s"] >= sum(asked.timings.get(s, 0.0) for s in VIDEO_STAGES) > 0


@pytest.mark.parametrize("argv", [["--help"], [], ["video.mp4"], ["video.mp4", "q", "--frames", "0"]])
def test_help_and_argument_errors_import_neither_torch_nor_transformers(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from loc3r.runtime.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    exit_code, heavy = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert exit_code == ("0" if argv == ["--help"] else "2")
    assert heavy == "[]"


def test_human_output_says_weights_are_random(demo_video: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(demo_video), "Where am I?", "q2", "--frames", "2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("position: x = ") == 2
    assert out.count("NOTE: model loc3r-tiny-random-v1 has RANDOM weights") == 2
    assert out.count("first token after ") == 2 and ": video " in out and ", question " in out


def test_console_script_runs_in_a_fresh_process(demo_video: Path) -> None:
    script = Path(sys.executable).with_name("loc3r-run")
    result = subprocess.run(
        [str(script), str(demo_video), "Where am I?", "--json", "--frames", "2", "--max-new-tokens", "2", "--no-cache"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["id"] == "loc3r-tiny-random-v1"
    # stderr is a pipe, not a terminal: the wait for imports and the model is still said
    said = result.stderr.splitlines()
    assert said[0] == "loc3r-run: loading model tiny (torch backend): imports and weights...", said
    assert said[1].startswith("loc3r-run: loaded in ") and said[1].endswith(" s")
    assert said[2:] == ["loc3r-run: encoding frames 1/2", "loc3r-run: encoding frames 2/2"], said  # each quarter of the frames


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.mp4", "Where am I?"], "missing.mp4"),
        (["{video}", ""], "the question is empty"),
        (["{video}", "Where?", "--model", "/nonexistent/bundle"], "is not a loc3r bundle"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    demo_video: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [a.format(video=demo_video) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loc3r-run: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_interactive_mode_reports_a_bad_question_and_asks_again(
    demo_video: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    too_long = "x " * 20000  # beyond the tiny model's 16384-token context
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{too_long}\n\nWhere am I?\n"))
    assert main([str(demo_video), "-i", "--json", "--frames", "2", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("loc3r-run: error: the prompt needs") == 1
    answers = [json.loads(line) for line in captured.out.splitlines()]
    assert [a["question"] for a in answers] == ["Where am I?"]


def test_a_plugged_in_decoder_feeds_the_pipeline(demo_video: Path) -> None:
    """A decoder that hands over RGB arrays (as a GStreamer appsink would) gives the answer
    of the built-in PyAV decoder, and is the one the pipeline calls."""
    from loc3r.runtime.frame import Frame
    from loc3r.runtime.video import FrameStream

    opened: list[tuple[str, int]] = []

    class RgbFrames:
        def __init__(self, path: str | Path, num_frames: int) -> None:
            opened.append((str(path), num_frames))
            self._stream = FrameStream(path, num_frames)
            self.info, self.indices, self.report = self._stream.info, self._stream.indices, self._stream.report

        def __iter__(self):  # noqa: ANN204
            return (Frame(f.index, f.timestamp_s, f.rgb.copy()) for f in self._stream)

        def close(self) -> None:
            self._stream.close()

    sampling = SamplingConfig(max_new_tokens=4)
    plugged = Pipeline.from_pretrained("tiny", decoder=RgbFrames).ask(demo_video, "Where am I?", sampling=sampling, num_frames=FRAMES)
    built_in = Pipeline.from_pretrained("tiny").ask(demo_video, "Where am I?", sampling=sampling, num_frames=FRAMES)
    assert opened == [(str(demo_video), FRAMES)]
    assert plugged.token_ids == built_in.token_ids and plugged.pose == built_in.pose


def test_the_python_api_says_the_weights_are_random(demo_video: Path) -> None:
    """``from_pretrained`` warns (a category of its own, so it can be filtered) and the
    answer's repr carries the warning: ``print(answer)`` never shows a bare pose."""
    from loc3r.errors import RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning, match="model loc3r-tiny-random-v1 has RANDOM weights") as caught:
        pipeline = Pipeline.from_pretrained("tiny")
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's line
    answer = pipeline.ask(demo_video, "Where am I?", num_frames=2, sampling=SamplingConfig(max_new_tokens=2))
    shown = repr(answer)
    assert shown.startswith(f"Answer(text={answer.text!r}, pose=Pose(x=")
    assert shown.endswith("warning='model loc3r-tiny-random-v1 has RANDOM weights: the answer and the pose are meaningless')")
    assert "token_ids" not in shown and "bev_points" not in shown


def test_plot_says_which_files_it_wrote(demo_video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--frames", "2", "--max-new-tokens", "2", "--plot", str(tmp_path / "bev.png")]
    assert main([str(demo_video), "Where am I?", "And now?", *base]) == 0
    maps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("map: ")]
    assert maps == [f"map: {tmp_path / 'bev.png'}", f"map: {tmp_path / 'bev_2.png'}"]
    assert all(Path(line.removeprefix("map: ")).is_file() for line in maps)
    assert main([str(demo_video), "Where am I?", "--json", *base]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["plot"] == str(tmp_path / "bev.png")


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: tiny)", "inference backend (default: torch)", "--max-new-tokens MAX_NEW_TOKENS (default: 64)", "--seed SEED (default: 0)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text
