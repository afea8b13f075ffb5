"""TensorRT targets' INT8 encoders from the user's calibration frames (``export/qdq.py``):
QDQ graphs as TensorRT's explicit quantization takes them, their error vs FP32 on held-out
frames measured in ONNX Runtime CPU, recorded and enforced; every misuse a one-line error.
The TensorRT build from these graphs is unverified on hardware (no GPU here)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file

from loc3r.errors import InternalError
from loc3r.export import cli as export_cli
from loc3r.export import graphs, qdq
from loc3r.models.bundle import load_bundle
from loc3r.models.tiny import resolve_model
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.ort import open_session

LOOSE = 0.1  # the tiny random model's calibrated step lands near 6e-2, past the default 5e-2


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("calibration")
    return {
        "landscape": write_demo_video(folder / "a.mp4", num_frames=30, width=160, height=120),
        "portrait": write_demo_video(folder / "b.mp4", num_frames=30, width=120, height=160),
        "two": write_demo_video(folder / "two.mp4", num_frames=2, width=64, height=48),
        "five": write_demo_video(folder / "five.mp4", num_frames=5, width=64, height=48),
    }


@pytest.fixture(scope="module")
def calibration(videos: dict[str, Path]) -> qdq.CalibrationSet:
    return qdq.read_calibration([videos["landscape"], videos["portrait"]], load_bundle(resolve_model("tiny")).config)


@pytest.fixture(scope="module")
def trt_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's FP32 graphs as a TensorRT target gets them (its opset), no LLM."""
    out = tmp_path_factory.mktemp("orin") / "orin"
    assert export_cli.main(["--target", "jetson-orin", "--out", str(out), "--llm", "none"]) == 0
    return out


@pytest.fixture(scope="module")
def calibrated(trt_graphs: Path, calibration: qdq.CalibrationSet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny FP32 graphs with their calibrated QDQ forms beside them, and the entries."""
    work = tmp_path_factory.mktemp("qdq") / "graphs"
    shutil.copytree(trt_graphs, work)
    init = load_file(str(work / "cut3r_init.safetensors"))
    paths = (work / "cut3r_encoder.onnx", work / "cut3r_step.onnx")
    encoder, step = qdq.calibrate_cut3r(paths, calibration, (init["state"], init["memory"]), (LOOSE, LOOSE))
    return work, {"cut3r_encoder": encoder, "cut3r_step": step, "vision": qdq.calibrate_vision(work / "vision.onnx", calibration, LOOSE)}


def test_the_calibration_set_holds_out_every_fourth_distinct_frame(calibration: qdq.CalibrationSet) -> None:
    assert calibration.frames == 32
    camera, siglip = calibration.part(held_out=True)
    assert [len(c) for c in camera] == [4, 4] and [len(s) for s in siglip] == [4, 4]
    assert camera[0].shape[-2:] != camera[1].shape[-2:]  # each video keeps its own aspect, as at run time
    assert calibration.describe() == {"videos": ["a.mp4", "b.mp4"], "frames": 32, "held_out_frames": 8, "method": "minmax"}


def test_qdq_graphs_are_symmetric_signed_int8_with_per_channel_weights(calibrated: tuple[Path, dict]) -> None:
    work, entries = calibrated
    for name, entry in entries.items():
        assert entry["file"] == f"{name}.int8.onnx" and entry["form"] == "qdq-static-int8"
        assert entry["calibration"]["held_out_frames"] == 8
        error = entry["error_vs_fp32"]
        assert error["tolerance"] == LOOSE and error["within_tolerance"] and 0 < error["relative"] <= LOOSE
        model = onnx.load(str(work / entry["file"]))
        ops = {node.op_type for node in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
        constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        zero_points = [constants[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
        assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # signed, symmetric
        stored = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
        assert {constants[n.input[0]].dtype for n in stored} <= {np.dtype(np.int8), np.dtype(np.int32)}  # weights; int32 biases
        weights = [n for n in stored if constants[n.input[0]].dtype == np.int8]
        assert weights and all(constants[n.input[1]].ndim == 1 and constants[n.input[1]].size > 1 for n in weights)  # per channel


def test_the_recorded_error_is_the_held_out_frames_error(calibrated: tuple[Path, dict], calibration: qdq.CalibrationSet) -> None:
    work, entries = calibrated
    fp32, int8 = open_session(work / "vision.onnx"), open_session(work / "vision.int8.onnx")
    worst = 0.0
    for pixels in calibration.part(held_out=True)[1]:
        want, got = fp32.run(None, {"pixels": pixels})[0], int8.run(None, {"pixels": pixels})[0]
        worst = max(worst, float(np.abs(want - got).max() / np.abs(want).max()))
    assert entries["vision"]["error_vs_fp32"]["relative"] == pytest.approx(worst, rel=1e-6)


def test_a_calibrated_graph_past_its_tolerance_fails_the_export(trt_graphs: Path, calibration: qdq.CalibrationSet, tmp_path: Path) -> None:
    shutil.copy(trt_graphs / "vision.onnx", tmp_path / "vision.onnx")
    shutil.copy(trt_graphs / "vision.onnx.data", tmp_path / "vision.onnx.data")
    with pytest.raises(InternalError) as failure:
        qdq.calibrate_vision(tmp_path / "vision.onnx", calibration, 1e-6)
    message = str(failure.value)
    assert message.startswith("vision: the calibrated INT8 graph is ") and message.endswith(
        " of the output scale away from FP32 on the held-out calibration frames (tolerance 1e-06): calibrate on more frames "
        "like your videos (--calibration), or export without --encoders int8 (FP16 engines)"
    )


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path) -> str:
    assert export_cli.main(["--target", "jetson-orin", "--out", str(out), "--llm", "none", *argv]) == 2
    assert not out.exists()
    return last_line(capsys)


def last_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line (after the progress line 'loading model ...')."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_each_misuse_of_calibration_is_one_line(videos: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert refusal(["--encoders", "int8"], capsys, out) == (
        "loc3r-export: error: --encoders int8 on jetson-orin-agx builds INT8 TensorRT engines from frames of your own videos, "
        "and no --calibration was given: add --calibration VIDEO [VIDEO...] (videos like the ones you will ask about), "
        "or export without --encoders int8 (FP16 engines)"
    )
    assert refusal(["--calibration", str(videos["landscape"])], capsys, out) == (
        "loc3r-export: error: --calibration is for --encoders int8 on TensorRT targets, not without --encoders int8: drop --calibration"
    )
    missing = tmp_path / "nope.mp4"
    assert refusal(["--encoders", "int8", "--calibration", str(missing)], capsys, out) == (
        f"loc3r-export: error: --calibration {missing}: no such file: give videos of the scenes you will ask about"
    )
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    assert refusal(["--encoders", "int8", "--calibration", str(bad)], capsys, out) == (
        f"loc3r-export: error: --calibration {bad}: cannot be read as a video (Invalid data found when processing input): "
        "give readable videos (mp4, mov, mkv, avi)"
    )
    assert refusal(["--encoders", "int8", "--calibration", str(videos["two"])], capsys, out) == (
        f"loc3r-export: error: --calibration {videos['two']}: 2 distinct frame(s) decoded, at least 4 per video are needed: give longer videos"
    )
    assert refusal(["--encoders", "int8", "--calibration", str(videos["five"])], capsys, out) == (
        "loc3r-export: error: --calibration: 5 frames decoded from 1 video(s), at least 8 are needed: give longer videos, or more of them"
    )
    assert export_cli.main(["--target", "cpu", "--out", str(out), "--llm", "none", "--encoders", "int8", "--calibration", str(videos["landscape"])]) == 2
    assert last_line(capsys) == (
        "loc3r-export: error: --calibration is for --encoders int8 on TensorRT targets, not on cpu, whose int8 is calibration-free: drop --calibration"
    )


@pytest.mark.slow
def test_a_jetson_export_records_the_calibrated_graphs_and_the_build_takes_them(
    videos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end (about 100 s): the manifest records each calibrated graph; the device build
    parses the QDQ graph and checks its engine against it at the INT8 tolerance."""
    from loc3r.export.device_build import build_request, calibrated_int8, tolerance
    from loc3r.export.manifest import load_manifest

    for make in ("camera_encoder_spec", "camera_step_spec", "vision_spec"):
        strict = getattr(graphs, make)
        monkeypatch.setattr(graphs, make, lambda *a, strict=strict: dataclasses.replace(strict(*a), int8_tolerance=LOOSE))
    out = tmp_path / "orin"
    argv = ["--target", "jetson-orin", "--out", str(out), "--llm", "none", "--encoders", "int8", "--calibration"]
    assert export_cli.main([*argv, str(videos["landscape"]), str(videos["portrait"])]) == 0
    manifest = load_manifest(out)
    assert manifest.encoders == "int8"
    for name in ("cut3r_encoder", "cut3r_step", "vision"):
        entry = manifest.artifacts[name]["int8"]
        assert entry["form"] == "qdq-static-int8" and entry["error_vs_fp32"]["within_tolerance"]
        assert calibrated_int8(manifest, name) and tolerance(manifest, name) == LOOSE
        profiles = manifest.value("device_build", "engines", name, "profiles", kind=list)
        request = build_request(manifest, name, profiles, "fp16-strongly-typed", f"{name}.engine", manifest.data["device_build"])
        assert request.onnx_file == out / f"{name}.int8.onnx"
    assert not calibrated_int8(manifest, "pose_head") and "int8" not in manifest.artifacts["pose_head"]
