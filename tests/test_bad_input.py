"""Every failure of loc3r-run / loc3r-export is one clear line, the right exit code, no
traceback and nothing half-written (issue 8). docs/robustness.md lists the same cases.

The CLIs run in-process (``main([...])`` + capsys) on the tiny model with 2 frames; two
cases run the console scripts in a subprocess to prove the exit codes end to end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from media import write_audio_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import loc3r.runtime.video as video_module
from loc3r import cli_support
from loc3r.digest import MEMO_FILE
from loc3r.errors import InputError, ModelError
from loc3r.export import cli as export_cli
from loc3r.export import exporter
from loc3r.export.manifest import FORMAT, MANIFEST_FILE, VERSION, load_manifest
from loc3r.export.tensorrt_build import check_engine_matches, engine_file_name
from loc3r.models.bundle import WEIGHTS_FILE, bundle_checksum
from loc3r.models.config import Loc3rConfig
from loc3r.models.prompt import PromptLayout, build_question_suffix, build_video_prefix
from loc3r.models.tiny import ensure_tiny_bundle
from loc3r.runtime import cli as run_cli
from loc3r.runtime import pipeline as pipeline_module
from loc3r.runtime import session as session_module
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.video import frame_to_rgb, read_video, sample_indices

FAST = ["--frames", "2", "--max-new-tokens", "2", "--no-cache"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # chmod does not stop root


# --- helpers ----------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> Result:
    """``loc3r-run argv`` in-process; argparse's usage errors exit through SystemExit."""
    return _call(run_cli.main, capsys, argv)


def export(capsys: pytest.CaptureFixture[str], *argv: object) -> Result:
    """``loc3r-export argv`` in-process; its progress lines (all but ``loc3r-export: ...``) are dropped."""
    result = _call(export_cli.main, capsys, argv)
    result.err = "".join(line for line in result.err.splitlines(keepends=True) if line.startswith("loc3r-export"))
    return result


def _call(main, capsys: pytest.CaptureFixture[str], argv: tuple[object, ...]) -> Result:  # noqa: ANN001
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return Result(code, out, err)


def assert_error(result: Result, code: int, *fragments: str, prog: str = "loc3r-run") -> str:
    """Exit ``code``; stderr is exactly one ``prog: error: ...`` line holding ``fragments``."""
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_nothing_left(folder: Path, expected: set[str]) -> None:
    """``folder`` holds exactly ``expected`` (no staging folders, no temporary files)."""
    assert {p.name for p in folder.iterdir()} == expected


def ok_json(result: Result) -> dict:
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    return json.loads(result.out.splitlines()[-1])


def write_video(path: Path, frames: list[np.ndarray], codec: str = "libx264", pix_fmt: str = "yuv420p", **stream_options: object) -> Path:
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if "rotation" in stream_options:
            stream.set_display_rotation(stream_options["rotation"])
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def halves(height: int = 48, width: int = 64) -> np.ndarray:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = (200, 40, 40)
    rgb[:, width // 2 :] = (40, 200, 40)
    return rgb


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def video(media: Path) -> Path:
    return write_demo_video(media / "demo.mp4", num_frames=8, width=64, height=48)


@pytest.fixture(scope="module")
def long_video(media: Path) -> Path:
    """40 frames, +faststart (the index is at the front): truncation keeps it readable."""
    return write_demo_video(media / "long.mp4", num_frames=40, width=64, height=48)


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_tiny_bundle()


@pytest.fixture()
def bundle_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle to damage."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_dir, copy)
    return copy


# --- video ------------------------------------------------------------------------------


def _truncated_to_header(d: Path, long_video: Path) -> Path:
    with av.open(str(long_video)) as container:
        first_packet = next(container.demux()).pos
    path = d / "header_only.mp4"
    path.write_bytes(long_video.read_bytes()[: first_packet + 10])
    return path


def _png_as_mp4(d: Path) -> Path:
    from PIL import Image

    path = d / "still.mp4"
    Image.fromarray(halves()).save(path, format="PNG")
    return path


def _write(d: Path, name: str, data: bytes) -> Path:
    (d / name).write_bytes(data)
    return d / name


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda d, v: d / "missing.mp4", ["missing.mp4: no such file", "check the path"]),
        (lambda d, v: d, ["is a directory, not a video file", "pass the path of one video file"]),
        (lambda d, v: _write(d, "empty.mp4", b""), ["is an empty file (0 bytes)", "re-copy"]),
        (lambda d, v: _write(d, "notes.mp4", b"hello\n" * 50), ["cannot be read as a video", "pass a video file"]),
        (lambda d, v: _png_as_mp4(d), ["is a still image", "pass a video file"]),
        (lambda d, v: write_audio_only(d / "sound.m4a"), ["has only audio, no video stream", "pass a video file"]),
        (_truncated_to_header, ["no decodable video frames", "damaged or truncated"]),
    ],
    ids=["missing", "directory", "zero-bytes", "text-as-mp4", "png-as-mp4", "audio-only", "truncated-to-header"],
)
def test_unusable_video(
    make, fragments: list[str], tmp_path: Path, long_video: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path, long_video)
    before = {p.name for p in tmp_path.iterdir()}
    line = assert_error(run(capsys, path, "Where am I?", *FAST), 2, *fragments)
    assert str(path) in line
    assert {p.name for p in tmp_path.iterdir()} == before


def test_truncated_mp4_answers_from_the_readable_frames(long_video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(long_video.read_bytes()[: long_video.stat().st_size // 2])
    result = run(capsys, cut, "Where am I?", "--json", "--frames", "4", "--max-new-tokens", "2", "--no-cache")
    out = ok_json(result)
    (warning,) = result.err.splitlines()
    assert warning.startswith(f"loc3r-run: warning: {cut}: only ") and "sampled frames were decodable" in warning
    report = out["video"]
    assert report["frames_requested"] == 4 and 0 < report["frames_decoded"] < 4
    assert report["frames"] == report["frames_decoded"]
    assert report["indices"] == sample_indices(40, 4)[: report["frames_decoded"]]


def test_single_frame_video(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_demo_video(tmp_path / "one.mp4", num_frames=1, width=64, height=48)
    out = ok_json(run(capsys, path, "Where am I?", "--json", *FAST))
    assert out["video"]["indices"] == [0, 0] and out["video"]["frames"] == 2


def test_fewer_frames_than_requested_repeat_indices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Policy: linspace indices repeat (sample_indices(3, 5) == [0, 0, 1, 1, 2]); the model
    always sees --frames frames, so fixed-shape engines keep one input shape."""
    path = write_demo_video(tmp_path / "three.mp4", num_frames=3, width=64, height=48)
    out = ok_json(run(capsys, path, "Where am I?", "--json", "--frames", "5", "--max-new-tokens", "2", "--no-cache"))
    assert out["video"]["indices"] == [0, 0, 1, 1, 2]
    assert "frames_requested" not in out["video"]  # repeats are not missing frames


def test_variable_frame_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Irregular pts: frames are sampled by decode index and stamped index / average fps,
    as LLaVA-Video (decord) does."""
    from fractions import Fraction

    path = tmp_path / "vfr.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate([0, 33, 66, 200, 233, 600, 633, 1000]):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    video = read_video(path, 4)
    assert video.indices == [0, 2, 4, 7]
    assert [round(float(f.mean()) / 20) for f in video.frames] == [0, 2, 4, 7]  # the right frames
    assert video.timestamps == pytest.approx([i / video.info.fps for i in (0, 2, 4, 7)])
    assert ok_json(run(capsys, path, "Where am I?", "--json", *FAST))["video"]["indices"] == [0, 7]


def test_portrait_with_rotation_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_video(tmp_path / "phone.mp4", [halves(64, 48)] * 3, rotation=90)
    frame = read_video(path, 1).frames[0]
    assert frame.shape == (48, 64, 3)  # stored 48x64 portrait, displayed turned a quarter
    assert ok_json(run(capsys, path, "Where am I?", "--json", *FAST))["video"]["frames"] == 2


@pytest.mark.parametrize(
    "codec, pix_fmt, suffix",
    [("ffv1", "gray", "mkv"), ("png", "rgba", "mov"), ("libx264", "yuv420p10le", "mp4")],
    ids=["grayscale", "rgba", "10-bit"],
)
def test_pixel_formats(codec: str, pix_fmt: str, suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_video(tmp_path / f"v.{suffix}", [halves()] * 3, codec=codec, pix_fmt=pix_fmt)
    rgb = read_video(path, 1).frames[0]
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    assert ok_json(run(capsys, path, "Where am I?", "--json", *FAST))["video"]["frames"] == 2


def test_huge_frames_are_scaled_down_while_converted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Policy: a sampled frame with a long side over MAX_DECODE_SIDE (2048) becomes RGB at
    that long side (aspect kept), so a 4K frame is a 6.6 MB array, not 26 MB."""
    big = np.zeros((2160, 4096, 3), np.uint8)
    big[:, :2048] = 200
    path = write_video(tmp_path / "4k.mp4", [big] * 2, codec="mpeg4")
    frame = read_video(path, 1).frames[0]
    assert frame.shape == (1080, 2048, 3)
    assert frame[:, :1000].mean() > 190 and frame[:, 1048:].mean() < 10  # same picture, smaller
    assert ok_json(run(capsys, path, "Where am I?", "--json", *FAST))["video"]["frames"] == 2


def test_frame_to_rgb_bounds_the_long_side() -> None:
    frame = av.VideoFrame.from_ndarray(halves(48, 64), format="rgb24")
    assert frame_to_rgb(frame).shape == (48, 64, 3)  # small frames are untouched
    np.testing.assert_array_equal(frame_to_rgb(frame), halves(48, 64))
    small = frame_to_rgb(frame, max_side=32)
    assert small.shape == (24, 32, 3) and small[:, :14].mean(axis=(0, 1)) == pytest.approx((200, 40, 40), abs=3)


def test_absurd_frame_size_is_refused_before_decoding(
    video: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(video_module, "MAX_DECODE_PIXELS", 32 * 32)
    assert_error(run(capsys, video, "Where am I?", *FAST), 2, "frames of 64x48 are larger than loc3r decodes", "scale the video down")


# --- text and flags ---------------------------------------------------------------------


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the model is loaded: these errors must come before any work."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the argument error")

    monkeypatch.setattr(pipeline_module.Pipeline, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["{video}", ""], ["the question is empty", "pass a non-empty question"]),
        (["{video}", "   \t "], ["the question is empty"]),
        (["{video}", "ok", " "], ["the question is empty"]),
        (["{video}"], ["no question given", "or -i to type them"]),
        ([], ["no video given"]),
    ],
    ids=["empty", "whitespace", "second-question", "no-question", "no-video"],
)
def test_bad_text_fails_before_any_work(
    argv: list[str], fragments: list[str], video: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_error(run(capsys, *[a.format(video=video) for a in argv], *FAST), 2, *fragments)


@pytest.mark.parametrize(
    "value, fragment",
    [("0", "argument --frames: must be at least 1, got 0"), ("abc", "argument --frames: 'abc' is not a whole number")],
)
def test_bad_frames_flag(value: str, fragment: str, video: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_error(run(capsys, video, "q", "--frames", value), 2, fragment, "(see loc3r-run --help)")


def test_too_many_frames_for_the_context_fails_before_decoding(
    video: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("frames were decoded before the length check")

    monkeypatch.setattr(pipeline_module, "iter_frames", refuse)
    start = time.perf_counter()
    line = assert_error(
        run(capsys, video, "Where am I?", "--frames", "100", "--no-cache"), 2,
        "100 frames x 211 tokens per frame", "the LLM's context limit is 16384 tokens", "--frames",
    )
    assert time.perf_counter() - start < 30
    most = int(re.search(r"\(--frames (\d+)\)", line).group(1))
    assert 60 < most < 78  # 77 x 211 = 16247 leaves no room for the text


def test_non_utf8_question_in_a_subprocess(video: Path, tmp_path: Path) -> None:
    """Raw bytes in argv (surrogate-escaped by Python) end in a clean exit 2, end to end."""
    script = Path(sys.executable).with_name("loc3r-run")
    result = subprocess.run(
        [str(script).encode(), str(video).encode(), b"where \xff\xfe am I?", b"--no-cache"],
        capture_output=True, timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert err.splitlines() == ["loc3r-run: error: the question is not valid UTF-8: re-encode the question as UTF-8"]


def test_missing_bundle_in_a_subprocess(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("loc3r-export")
    result = subprocess.run(
        [str(script), "--model", str(tmp_path / "nowhere"), "--target", "cpu", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("loc3r-export: error")]
    assert result.stderr.startswith(f"loading model {tmp_path / 'nowhere'} and checking what the export needs ...")
    assert lines == [f"loc3r-export: error: {tmp_path / 'nowhere'} is not a loc3r bundle (no config.json): "
                     "pass a folder written by loc3r-convert, or --model tiny"]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# --- models and artifacts ---------------------------------------------------------------


def _edit_config(bundle: Path, edit) -> None:  # noqa: ANN001
    config = json.loads((bundle / "config.json").read_text())
    edit(config)
    (bundle / "config.json").write_text(json.dumps(config))


def _drop_tensor(bundle: Path) -> str:
    tensors = load_file(str(bundle / WEIGHTS_FILE))
    name = sorted(tensors)[0]
    del tensors[name]
    save_file(tensors, str(bundle / WEIGHTS_FILE), metadata={"format": "pt"})
    return name


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (lambda b: (b / "config.json").unlink(), ["is not a loc3r bundle (no config.json)", "--model tiny"]),
        (lambda b: (b / "config.json").write_text('{"model_id": "x",'), ["config.json is not valid JSON", "re-create the bundle"]),
        (lambda b: _edit_config(b, lambda c: c.update(colour="blue")), ["config.json has a field this version does not know", "colour"]),
        (lambda b: _edit_config(b, lambda c: c["llm"].update(hidden_size="64")), ["config.json: llm.hidden_size is '64', expected an integer from 1 to 65536"]),
        (lambda b: _edit_config(b, lambda c: c["heads"].update(hidden_size=48)), ["mis-shaped tensors", "config.json and weights disagree", "re-create the bundle"]),
        (_drop_tensor, ["1 missing tensors", "config.json and weights disagree"]),
        (lambda b: _truncate(b / WEIGHTS_FILE), ["model.safetensors is truncated", "re-create the bundle"]),
        (lambda b: (b / WEIGHTS_FILE).unlink(), ["has no model.safetensors"]),
    ],
    ids=["no-config", "invalid-json", "unknown-field", "wrong-type", "config-vs-tensors", "missing-tensor", "truncated-safetensors", "no-weights"],
)
def test_damaged_bundle(damage, fragments: list[str], bundle_copy: Path, video: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damage(bundle_copy)
    assert_error(run(capsys, video, "Where am I?", "--model", bundle_copy, *FAST), 2, *fragments)


def write_manifest(folder: Path, checksum: str, **changes: object) -> Path:
    """A minimal manifest in the layout loc3r-export writes (no graphs are opened before
    the identity and shape checks refuse it)."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = b"not opened"
    (folder / "vision.onnx").write_bytes(graph)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"id": "loc3r-tiny-random-v1", "checksum": checksum},
        "target": {"name": "cpu"},
        "precision": "fp32",
        "artifacts": {
            "vision": {
                "file": "vision.onnx",
                "inputs": [{"name": "pixels", "shape": ["frames", 3, 384, 384], "dtype": "float32"}],
                "outputs": [{"name": "tokens", "shape": ["frames", 210, 64], "dtype": "float32"}],
            }
        },
        "files": {"vision.onnx": {"size": len(graph), "sha256": hashlib.sha256(graph).hexdigest()}},
        **changes,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


def _folder(path: Path, manifest: bytes | None = None) -> Path:
    path.mkdir()
    if manifest is not None:
        (path / MANIFEST_FILE).write_bytes(manifest)
    return path


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda d, c: write_manifest(d, "0" * 64), ["were exported from model loc3r-tiny-random-v1 (checksum 000000000000)", "re-export them from this model"]),
        (lambda d, c: write_manifest(d, c, precision="int3"), ["is corrupt: precision 'int3' is not one of fp32, fp16", "re-run loc3r-export"]),
        (
            lambda d, c: write_manifest(d, c, artifacts={"vision": {"file": "vision.onnx", "outputs": [{"name": "tokens", "shape": [1]}],
                                                                    "inputs": [{"name": "pixels", "shape": ["frames", 3, 224, 224]}]}}),
            ["manifest vision.pixels has shape ['frames', 3, 224, 224], the model needs ['frames', 3, 384, 384]"],
        ),
        (lambda d, c: write_manifest(d, c, artifacts={"vision": "vision.onnx"}), ["is corrupt: artifact 'vision' is malformed"]),
        (lambda d, c: _folder(d, b'{"format": "loc3r-manifest", \x00'), ["manifest.json is not valid JSON", "re-run loc3r-export"]),
        (lambda d, c: _folder(d), ["has no manifest.json", "pass the folder written by loc3r-export --out"]),
    ],
    ids=["other-model", "other-precision", "other-shape", "malformed-artifact", "corrupt-json", "no-manifest"],
)
def test_unusable_manifest(make, fragments: list[str], tiny_dir: Path, tmp_path: Path, video: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engines = make(tmp_path / "engines", bundle_checksum(tiny_dir))
    result = run(capsys, video, "Where am I?", "--model", "tiny", "--backend", "onnxruntime", "--engines", engines, *FAST)
    assert_error(result, 2, *fragments)


def test_engine_for_another_gpu_or_tensorrt(tmp_path: Path) -> None:
    theirs = tmp_path / engine_file_name("cut3r_step", "10.3.0", "87")
    check_engine_matches(theirs, "10.3.0.26", "87")  # the same TensorRT minor and GPU: fine
    for trt, sm in (("10.3.0", "86"), ("10.7.0", "87")):
        with pytest.raises(ModelError, match="was built for another TensorRT/GPU") as err:
            check_engine_matches(theirs, trt, sm)
        assert f"sm_{sm}" in str(err.value) and "rebuild the engines on this device" in str(err.value)


def test_corrupt_encoding_cache_entry_is_recomputed(
    tiny_dir: Path, video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))
    argv = [video, "Where am I?", "--json", "--model", tiny_dir, "--frames", "2", "--max-new-tokens", "2"]
    first = ok_json(run(capsys, *argv))
    assert first["video"]["encoding_cache"] == "stored"
    (entry,) = (tmp_path / "home" / "cache" / "encodings").glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-100:] = bytes(100)  # zero the end of the tensor bytes: the checksum no longer holds
    entry.write_bytes(bytes(data))
    result = run(capsys, *argv)
    again = ok_json(result)
    assert result.err.startswith(f"loc3r-run: warning: encoding cache entry {entry.name} is corrupt")
    assert result.err.count("\n") == 1 and "discarded, recomputing" in result.err
    assert again["video"]["encoding_cache"] == "stored" and again["answer_token_ids"] == first["answer_token_ids"]
    assert_nothing_left(entry.parent, {entry.name, "scenes"})


# --- output paths, full disks, Ctrl-C ---------------------------------------------------


@pytest.fixture()
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder nobody may write to: chmod 0555, or (as root, where chmod does not stop
    writes) every create inside it refused with EACCES, as the kernel would."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if not AS_ROOT:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    import tempfile

    def refuse_in(real):  # noqa: ANN001, ANN202
        def create(*args: object, dir: object = None, **kwargs: object):  # noqa: A002, ANN202
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".tmp"))
            return real(*args, dir=dir, **kwargs)

        return create

    monkeypatch.setattr(tempfile, "mkdtemp", refuse_in(tempfile.mkdtemp))
    monkeypatch.setattr(tempfile, "mkstemp", refuse_in(tempfile.mkstemp))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder and mode & os.W_OK else real_access(p, mode, **kw))
    yield folder


def test_export_into_a_read_only_folder(read_only: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = export(capsys, "--model", "tiny", "--target", "cpu", "--out", read_only / "engines", "--llm", "none")
    assert_error(result, 2, f"{read_only} cannot be written (permission denied)", "pass --out in a folder you can write to", prog="loc3r-export")
    assert_nothing_left(read_only, set())


def test_export_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "engines").write_text("not a folder")
    result = export(capsys, "--target", "cpu", "--out", tmp_path / "engines")
    assert_error(result, 2, "is a file, not a folder", "pass a new folder", prog="loc3r-export")
    assert (tmp_path / "engines").read_text() == "not a folder"
    assert_nothing_left(tmp_path, {"engines"})


def test_plot_into_a_read_only_folder_fails_before_any_work(
    read_only: Path, video: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run(capsys, video, "Where am I?", "--plot", read_only / "map.png", *FAST)
    assert_error(result, 2, f"cannot write to {read_only} (permission denied)", "choose a folder you can write to for --plot")


def test_plot_path_is_a_folder(tmp_path: Path, video: Path, no_model: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert_error(run(capsys, video, "Where am I?", "--plot", tmp_path, *FAST), 2, "is a folder", "pass the path of a .png file")


def test_plot_write_refused_late_is_still_one_line(
    video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The folder turns read-only while the video is being encoded (the early check passed)."""
    import loc3r.fileio as fileio_module

    real = fileio_module.tempfile.mkstemp

    def refuse(*args: object, dir: object = None, **kwargs: object):  # noqa: A002, ANN202
        if dir is not None and Path(dir) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".map.abc.png"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fileio_module.tempfile, "mkstemp", refuse)
    result = run(capsys, video, "Where am I?", "--plot", tmp_path / "map.png", *FAST)
    assert_error(result, 2, f"cannot access {tmp_path} (Permission denied)")
    assert_nothing_left(tmp_path, set())


def _fail_mid_export(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """The first stage writes half a file into the staging folder, then ``error``."""

    def stage(request: object, out: Path) -> None:
        with open(out / "cut3r_step.onnx", "wb") as stream:
            stream.write(b"\x08\x01" * 1000)
        if isinstance(error, OSError):
            error.filename = str(out / "cut3r_step.onnx")
        raise error

    monkeypatch.setattr(exporter, "export_camera", stage)


def test_disk_full_during_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engines"
    _fail_mid_export(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    result = export(capsys, "--model", "tiny", "--target", "cpu", "--out", out, "--llm", "none")
    assert_error(
        result, 1, f"the disk is full (No space left on device) writing in {tmp_path}", "free some space", prog="loc3r-export"
    )
    assert_nothing_left(tmp_path, set())


def test_ctrl_c_during_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engines"
    _fail_mid_export(monkeypatch, KeyboardInterrupt())
    result = export(capsys, "--model", "tiny", "--target", "cpu", "--out", out, "--llm", "none")
    assert result.code == 130 and result.err == "loc3r-export: interrupted\n"
    assert_nothing_left(tmp_path, set())


def test_ctrl_c_during_run(
    tiny_dir: Path, video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))
    calls = []

    def interrupt(*args: object) -> None:
        calls.append(args)
        if len(calls) == 2:  # the second frame
            raise KeyboardInterrupt
        return real(*args)

    real = session_module.camera_pixels
    monkeypatch.setattr(session_module, "camera_pixels", interrupt)
    result = run(capsys, video, "Where am I?", "--model", tiny_dir, "--plot", tmp_path / "out" / "map.png", "--frames", "2")
    assert result.code == 130 and result.err == "loc3r-run: interrupted\n"
    assert not (tmp_path / "out").exists()
    # no cache entry, no temporary file: only the digest memo of the bundle, verified before the
    # interrupt, is kept (it vouches for files that did not change)
    left = [p for p in (tmp_path / "home").rglob("*") if p.is_file()]
    assert [p.relative_to(tmp_path / "home").as_posix() for p in left] in ([], [f"cache/{MEMO_FILE}"])


# --- the OSError policy of run_cli --------------------------------------------------------


@pytest.mark.parametrize(
    "error, code, line",
    [
        (PermissionError(errno.EACCES, "Permission denied", __file__), 2, f"cannot access {__file__} (Permission denied): fix its permissions"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x/.out.abc"), 2, "cannot access /mnt (Read-only file system)"),
        (OSError(errno.ENOSPC, "No space left on device"), 1, "the disk is full (No space left on device): free some space"),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/home"), 1, "the disk is full (Disk quota exceeded) writing in /home"),
        (OSError(errno.EIO, "Input/output error"), 1, "internal error: OSError: [Errno 5] Input/output error (rerun with --debug"),
        (ValueError("boom\nsecond line"), 1, "internal error: ValueError: boom (rerun with --debug"),
    ],
    ids=["permission", "read-only-fs", "disk-full", "quota", "eio", "bug"],
)
def test_run_cli_maps_os_errors(error: BaseException, code: int, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    def body() -> int:
        raise error

    assert cli_support.run_cli("prog", body, debug=False) == code
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and line in err and "Traceback" not in err
    assert cli_support.run_cli("prog", body, debug=True) == code
    assert "Traceback" in capsys.readouterr().err  # --debug shows it


# --- properties ---------------------------------------------------------------------------

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(st.integers(1, 10_000), st.integers(1, 128))
def test_sampler_is_linspace_uniform(total: int, num: int) -> None:
    idx = sample_indices(total, num)
    assert idx == np.linspace(0, total - 1, num, dtype=int).tolist()
    gaps = np.diff(idx)
    assert all(g >= 0 for g in gaps) and (num < 3 or gaps.max() - gaps.min() <= 1)
    if total < num:  # short video: every frame is used, repeated as evenly as linspace goes
        assert set(idx) == set(range(total))


_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40).filter(
    lambda t: not any(tok in t for tok in ("<|im_start|>", "<|im_end|>", "<Pos>", "<Ori>"))
)


@PROPERTY
@given(
    frames=st.integers(1, 40),
    vision_tokens=st.sampled_from([1, 182, 210]),
    situation=_TEXT,
    question=_TEXT.filter(lambda t: t.strip() != ""),
)
def test_layout_puts_pos_ori_and_cameras_where_it_says(tiny_tokenizer, frames: int, vision_tokens: int, situation: str, question: str) -> None:  # noqa: ANN001
    prefix = build_video_prefix(tiny_tokenizer, frames, vision_tokens, 10.0, list(np.linspace(0, 9.9, frames)))
    suffix = build_question_suffix(tiny_tokenizer, question, situation)
    layout = PromptLayout(prefix, suffix)
    ids = [*prefix.head_ids, *([-1] * (frames * prefix.tokens_per_frame)), *prefix.tail_ids, *suffix.ids]
    assert len(ids) == layout.length
    assert ids[layout.pos_index] == tiny_tokenizer.pos_id and ids[layout.ori_index] == tiny_tokenizer.ori_id
    assert ids.count(tiny_tokenizer.pos_id) == 1 and ids.count(tiny_tokenizer.ori_id) == 1
    cameras = layout.camera_indices
    assert cameras[0] == prefix.video_start and len(cameras) == frames
    assert set(np.diff(cameras).tolist()) <= {1 + vision_tokens}
    assert layout.pos_index > cameras[-1] + vision_tokens


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def _near_valid_config() -> st.SearchStrategy[dict]:
    base = Loc3rConfig(model_id="m").to_dict()
    keys = st.sampled_from([*base, "vision", "llm", "heads", "extra"])
    return st.dictionaries(keys, _JSON, max_size=4).map(lambda patch: {**base, **patch})


@PROPERTY
@given(st.one_of(_JSON, _near_valid_config()))
def test_config_reader_raises_only_model_errors(data: object) -> None:
    try:
        config = Loc3rConfig.from_dict(data)  # type: ignore[arg-type]
    except (ModelError, InputError):
        return
    assert isinstance(config.llm.hidden_size, int) and config.llm.hidden_size >= 1


def _near_valid_manifest() -> st.SearchStrategy[dict]:
    base = {"format": FORMAT, "version": VERSION, "model": {"checksum": "x"}, "target": {}, "precision": "fp32", "artifacts": {}}
    return st.dictionaries(st.sampled_from([*base, "llm"]), _JSON, max_size=3).map(lambda patch: {**base, **patch})


@PROPERTY
@given(st.one_of(_JSON, _near_valid_manifest(), st.binary(max_size=64)))
def test_manifest_reader_raises_only_model_errors(tmp_path_factory: pytest.TempPathFactory, data: object) -> None:
    folder = tmp_path_factory.mktemp("m")
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    (folder / MANIFEST_FILE).write_bytes(raw)
    try:
        manifest = load_manifest(folder)
    except ModelError:
        return
    assert isinstance(manifest.model_checksum, str) and isinstance(manifest.artifacts, dict)
