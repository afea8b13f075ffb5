"""The TensorRT path's pure parts (names, profiles, command lines, refusals) without TensorRT."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from loc3r.errors import InputError, ModelError
from loc3r.export.tensorrt_build import (
    Profile,
    check_engine_matches,
    engine_file_name,
    import_tensorrt,
    resolve_profile,
    trtexec_command,
)

ROOT = Path(__file__).resolve().parents[1]


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def test_engine_names_carry_tensorrt_version_and_sm() -> None:
    assert engine_file_name("cut3r_step", "10.3.0.30", "87") == "cut3r_step_trt10.3_sm87.engine"
    check_engine_matches(Path("cut3r_step_trt10.3_sm87.engine"), "10.3.0", "87")
    with pytest.raises(ModelError, match="built for another TensorRT/GPU .* TensorRT 10.7.0, sm_87"):
        check_engine_matches(Path("cut3r_step_trt10.3_sm87.engine"), "10.7.0", "87")
    with pytest.raises(ModelError, match="sm_89"):
        check_engine_matches(Path("vision_trt10.3_sm87.engine"), "10.3", "89")


def test_profile_fills_named_axes_and_keeps_fixed_ones() -> None:
    inputs = [
        {"name": "pixels", "shape": ["frames", 3, 384, 384]},
        {"name": "image", "shape": [1, 3, 384, 512]},
    ]
    profile = resolve_profile(inputs, {"frames": (1, 8, 32)})
    assert profile.shapes == {"pixels": ((1, 3, 384, 384), (8, 3, 384, 384), (32, 3, 384, 384))}
    with pytest.raises(ModelError, match="no optimisation range for axis 'frames' of pixels"):
        resolve_profile(inputs, {})


def test_trtexec_line_has_profile_precision_workspace_and_cache() -> None:
    profile = Profile({"pixels": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))})
    line = trtexec_command(Path("vision.onnx"), Path("vision.engine"), profile, True, 4096, Path("timing.cache"))
    assert shlex.split(line) == [
        "trtexec",
        "--onnx=vision.onnx",
        "--saveEngine=vision.engine",
        "--minShapes=pixels:1x3x8x8",
        "--optShapes=pixels:2x3x8x8",
        "--maxShapes=pixels:4x3x8x8",
        "--memPoolSize=workspace:4096M",
        "--timingCacheFile=timing.cache",
        "--skipInference",
        "--fp16",
        "--precisionConstraints=obey",
        "--layerPrecisions=*LayerNorm*:fp32,*Softmax*:fp32",
    ]
    fp32 = trtexec_command(Path("a.onnx"), Path("a.engine"), Profile({}), False, 512, Path("t.cache"))
    assert "--fp16" not in fp32 and "Shapes" not in fp32


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed")
def test_missing_tensorrt_says_where_to_build() -> None:
    with pytest.raises(InputError, match="TensorRT is not installed here.*loc3r-export build --manifest"):
        import_tensorrt()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configure_fails_clearly_without_tensorrt(tmp_path: Path) -> None:
    if tensorrt_available():
        pytest.skip("TensorRT present: configure would succeed")
    result = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "loc3r native:" in result.stderr
    assert ("TensorRT not found" in result.stderr) or ("CUDA toolkit not found" in result.stderr)


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA GPU")
def test_build_and_run_engines_on_this_gpu(tmp_path: Path) -> None:
    from loc3r.export import cli as export_cli
    from loc3r.runtime.demo_video import write_demo_video
    from loc3r.runtime.pipeline import Pipeline

    out = tmp_path / "engines"
    assert export_cli.main(["--target", "x86-cuda", "--out", str(out), "--llm", "fp16"]) == 0
    assert export_cli.main(["build", "--manifest", str(out / "manifest.json")]) == 0
    video = write_demo_video(tmp_path / "v.mp4", num_frames=8)
    ref = Pipeline.from_pretrained("tiny").ask(video, "Where am I?", num_frames=2)
    trt = Pipeline.from_pretrained("tiny", backend="tensorrt", engines=out).ask(video, "Where am I?", num_frames=2)
    assert trt.pose.x == pytest.approx(ref.pose.x, abs=5e-2)
