"""loc3r-export for a VGGT bundle: the vggt_encode graph, its manifest entry, the onnxruntime
backend against torch, the TensorRT profile, and --vggt-size."""

from __future__ import annotations

from pathlib import Path

import pytest

from loc3r.errors import InputError
from loc3r.export import cli as export_cli
from loc3r.export.manifest import load_manifest
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline

FRAMES = 4
SIZE = [168, 224]  # tiny VGGT: width 224, 4:3 -> 12 patch rows


@pytest.fixture(scope="module")
def vggt_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "cpu-vggt"
    assert export_cli.main(["--model", "tiny-vggt", "--target", "cpu", "--out", str(out), "--llm", "none"]) == 0
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("v") / "v.mp4", num_frames=12, width=160, height=120)


def test_manifest_records_the_clip_graph(vggt_export: Path) -> None:
    manifest = load_manifest(vggt_export)
    assert set(manifest.artifacts) == {"vggt_encode", "vision", "pose_head", "bev_head"}
    assert "cut3r_size" not in manifest.data
    graph = manifest.artifacts["vggt_encode"]
    assert graph["inputs"] == [{"name": "images", "shape": ["clip_frames", 3, *SIZE], "dtype": "float32"}]
    assert graph["outputs"] == [{"name": "camera", "shape": ["clip_frames", 64], "dtype": "float32"}]
    assert graph["parity"]["within_tolerance"] is True and graph["parity"]["runs"] == 3
    assert graph["parity"]["max_abs"] <= graph["tolerance"]["atol"]


def test_onnxruntime_backend_matches_torch(vggt_export: Path, video: Path) -> None:
    sampling = SamplingConfig(max_new_tokens=6)
    ref = Pipeline.from_pretrained("tiny-vggt").ask(video, "Where am I?", num_frames=FRAMES, sampling=sampling)
    ort = Pipeline.from_pretrained("tiny-vggt", backend="onnxruntime", engines=vggt_export).ask(
        video, "Where am I?", num_frames=FRAMES, sampling=sampling
    )
    assert ort.model.backend == "onnxruntime" and ort.model.encoder_3d == "vggt"
    assert ort.token_ids == ref.token_ids
    for field in ("x", "y", "sigma", "theta_rad"):
        assert getattr(ort.pose, field) == pytest.approx(getattr(ref.pose, field), abs=1e-4)


def test_other_frame_size_names_the_re_export(vggt_export: Path, tmp_path: Path) -> None:
    wide = write_demo_video(tmp_path / "wide.mp4", num_frames=4, width=224, height=126)
    pipeline = Pipeline.from_pretrained("tiny-vggt", backend="onnxruntime", engines=vggt_export)
    with pytest.raises(InputError, match="exported for 168x224 frames, this video gives 126x224.*--vggt-size 126x224"):
        pipeline.open(wide, 2)


def test_jetson_export_gives_the_clip_a_frame_profile_and_an_fp16_graph(tmp_path: Path) -> None:
    out = tmp_path / "orin-vggt"
    assert export_cli.main(["--model", "tiny-vggt", "--target", "jetson-orin", "--out", str(out), "--llm", "none"]) == 0
    manifest = load_manifest(out)
    assert "cut3r_input" not in manifest.data and set(manifest.artifacts) == {"vggt_encode", "vision", "pose_head", "bev_head"}
    fp16 = manifest.artifacts["vggt_encode"]["fp16"]
    assert fp16["file"] == "vggt_encode.fp16.onnx" and fp16["error_vs_fp32"]["relative"] <= fp16["error_vs_fp32"]["tolerance"]
    engine = manifest.data["device_build"]["engines"]["vggt_encode"]
    assert engine["engine"] == "vggt_encode_trt10.3_sm87.engine"
    assert engine["profiles"] == [{"images": [[1, 3, *SIZE], [32, 3, *SIZE], [64, 3, *SIZE]]}]
    assert "--minShapes=images:1x3x168x224" in engine["trtexec"] and "--maxShapes=images:64x3x168x224" in engine["trtexec"]
    items = {i["name"] for i in manifest.data["memory_plan"]["items"]}
    assert "VGGT clip (32 frames)" in items and not any(name.startswith("CUT3R") for name in items)


@pytest.mark.parametrize(
    ("model", "size", "message"),
    [
        ("tiny", "168x224", "--vggt-size is for VGGT bundles"),
        ("tiny-vggt", "170x224", "multiples of 14"),
        ("tiny-vggt", "168x518", "VGGT frames are 224 wide and at most that high: e.g. 126x224 for 16:9"),
        ("tiny-vggt", "252x224", "VGGT frames are 224 wide and at most that high"),
    ],
)
def test_bad_vggt_size(model: str, size: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", model, "--target", "cpu", "--out", str(tmp_path / "x"), "--vggt-size", size]
    assert export_cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
