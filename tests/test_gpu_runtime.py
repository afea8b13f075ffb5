"""``--backend tensorrt`` and onnxruntime-gpu without a GPU: the lean runtime (buffers once,
state on the device, CUDA graph replay, shape checks before TensorRT, profile choice) and the
provider set-up and placement check of ONNX Runtime, against the fakes of ``gpu_fakes``."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gpu_fakes import FakeCudart, FakeGpuOnnxRuntime, FakeTensorRT, install_cudart

from loc3r.errors import InputError, ModelError
from loc3r.export.device_build import build_from_manifest
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline

FRAMES = 10  # a streaming batch of 8, then 2
SAMPLING = SamplingConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def built(jetson_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Jetson export with FP32 engines built by the fake TensorRT 10.3 (exact outputs)."""
    out = Path(shutil.copytree(jetson_export, tmp_path_factory.mktemp("built") / "orin"))
    with pytest.MonkeyPatch.context() as mp:
        gpu(mp)
        build_from_manifest(out, progress=lambda m: None, precision="fp32")
    return out


def gpu(monkeypatch: pytest.MonkeyPatch, sm: tuple[int, int] = (8, 7)) -> FakeTensorRT:
    cudart = install_cudart(monkeypatch, FakeCudart(sm=sm))
    trt = FakeTensorRT("10.3.0.30", cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {
        "16:9": write_demo_video(folder / "wide.mp4", num_frames=16, width=320, height=180),
        "9:16": write_demo_video(folder / "tall.mp4", num_frames=16, width=180, height=320),
    }


@pytest.fixture(scope="module")
def reference(videos: dict[str, Path]) -> dict[str, object]:
    torch_pipeline = Pipeline.from_pretrained("tiny")
    return {aspect: torch_pipeline.ask(video, "Where am I?", num_frames=FRAMES, sampling=SAMPLING) for aspect, video in videos.items()}


def assert_same_answer(got: object, want: object) -> None:
    assert got.token_ids == want.token_ids
    for field in ("x", "y", "sigma", "theta_rad"):
        assert getattr(got.pose, field) == pytest.approx(getattr(want.pose, field), abs=1e-4)


# -- TensorRT --------------------------------------------------------------------------------------


def test_tensorrt_backend_keeps_the_state_on_the_device_and_replays_the_step(
    built: Path, videos: dict[str, Path], reference: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    trt = gpu(monkeypatch)
    cudart = trt.cudart
    pipeline = Pipeline.from_pretrained("tiny", backend="tensorrt", engines=built)
    assert pipeline.stages.overlap_prefill  # the video prefill runs beside the encoders (the answers below: the same)
    allocations = cudart.count("cudaMalloc")
    camera = pipeline.stages.camera
    answers = {}
    # the step's first run at a patch count is plain, the second captured, every later one
    # replayed; 288x512 and 512x288 frames have the same count, so the portrait video replays all
    replays = {"16:9": FRAMES - 1, "9:16": FRAMES}
    for aspect, video in videos.items():
        launches = cudart.launches
        answers[aspect] = pipeline.ask(video, "Where am I?", num_frames=FRAMES, sampling=SAMPLING)
        assert_same_answer(answers[aspect], reference[aspect])
        assert cudart.launches - launches == replays[aspect]
        assert camera.encoder.context.profile == {"16:9": 0, "9:16": 1}[aspect]  # landscape, then portrait
    assert cudart.count("cudaMalloc") == allocations  # every buffer was allocated when the engines were opened
    state_bytes = {camera.init[name].nbytes for name in ("state", "memory")}
    host_bound = [args[2] for name, args in cudart.calls if name == "cudaMemcpyAsync" and args[3] == cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost]
    assert host_bound and not state_bytes & set(host_bound)  # neither state nor memory ever came back to the host
    scratch = {s.context.memory for s in (camera.encoder, camera.step_engine, pipeline.stages.vision.session)}
    assert len(scratch) == 1  # one activation scratch shared by every engine


def test_without_cuda_graphs_the_step_runs_directly(built: Path, videos: dict[str, Path], reference: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    trt = gpu(monkeypatch)
    refuse = lambda stream, mode: (FakeCudart.cudaError_t.cudaErrorMemoryAllocation,)  # noqa: E731
    monkeypatch.setattr(trt.cudart, "cudaStreamBeginCapture", refuse)
    pipeline = Pipeline.from_pretrained("tiny", backend="tensorrt", engines=built)
    assert_same_answer(pipeline.ask(videos["16:9"], "Where am I?", num_frames=FRAMES, sampling=SAMPLING), reference["16:9"])
    assert trt.cudart.launches == 0 and not pipeline.stages.camera.use_graphs


def test_shapes_are_checked_against_the_profiles_before_tensorrt(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu(monkeypatch)
    stages = Pipeline.from_pretrained("tiny", backend="tensorrt", engines=built).stages
    vision = stages.vision.session
    with pytest.raises(InputError, match=r"vision_trt10.3_sm87.engine: pixels 9x3x384x384 is outside the engine's optimisation profiles \(pixels 1x3x384x384..8x3x384x384\)"):
        vision.select({"pixels": (9, 3, 384, 384)})
    runs = vision.context.runs
    tokens = stages.vision.encode(torch.zeros(9, 3, 384, 384))  # the stage splits what one run cannot take
    assert tokens.shape == (9, 210, 64) and vision.context.runs - runs == 2
    with pytest.raises(InputError, match="a 512x96 CUT3R input is outside what the export serves"):
        stages.camera.encode(torch.zeros(1, 3, 512, 96))
    points = stages.heads.bev(torch.zeros(9000, 64))  # more tokens than the profile's 8192
    assert points.shape == (9000, 2)


def test_engines_of_another_gpu_are_refused(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu(monkeypatch, sm=(8, 9))
    with pytest.raises(ModelError, match=r"engine cut3r_encoder_trt10.3_sm87.engine was built for another TensorRT/GPU \(this device: TensorRT 10.3.0.30, sm_89\)"):
        Pipeline.from_pretrained("tiny", backend="tensorrt", engines=built)


def test_an_export_without_built_engines_says_how_to_build(jetson_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu(monkeypatch)
    with pytest.raises(ModelError, match="no TensorRT engines have been built in .*loc3r-export build --manifest"):
        Pipeline.from_pretrained("tiny", backend="tensorrt", engines=jetson_export)


# -- ONNX Runtime on the GPU -----------------------------------------------------------------------


def test_onnxruntime_gpu_uses_the_tensorrt_provider_with_the_plan_profiles(
    jetson_export: Path, tmp_path: Path, videos: dict[str, Path], reference: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    orin = Path(shutil.copytree(jetson_export, tmp_path / "orin"))
    ort = FakeGpuOnnxRuntime().install(monkeypatch)
    pipeline = Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=orin)
    assert_same_answer(pipeline.ask(videos["9:16"], "Where am I?", num_frames=FRAMES, sampling=SAMPLING), reference["9:16"])
    asked = {Path(path).name: providers for path, providers in ort.sessions if providers != ["CPUExecutionProvider"]}
    checked = sorted(Path(path).name for path, providers in ort.sessions if providers == ["CPUExecutionProvider"])
    assert checked == sorted(asked), "each TensorRT EP graph is checked against ONNX Runtime FP32 on the CPU"
    name, options = asked["cut3r_encoder.onnx"][0]
    assert name == "TensorrtExecutionProvider" and asked["cut3r_encoder.onnx"][1:] == ["CUDAExecutionProvider"]
    assert options["trt_fp16_enable"] is True and options["trt_layer_norm_fp32_fallback"] is True and options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(orin / "ort_trt_cache")
    # one range covering the landscape and the portrait profiles
    assert (options["trt_profile_min_shapes"], options["trt_profile_opt_shapes"], options["trt_profile_max_shapes"]) == (
        "image:1x3x128x128",
        "image:8x3x288x512",
        "image:8x3x512x512",
    )
    assert asked["pose_head.onnx"][0][1]["trt_profile_max_shapes"] == "pos_state:1x64,ori_state:1x64"


def test_a_listed_but_unloadable_tensorrt_provider_is_not_asked_for(
    jetson_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pip's TensorRT without its library on the loader path: ONNX Runtime lists the EP, a
    session asking for it would fall back; loc3r probes libnvinfer first and asks for CUDA."""
    orin = Path(shutil.copytree(jetson_export, tmp_path / "orin"))
    ort = FakeGpuOnnxRuntime(nvinfer_missing="libnvinfer.so.10 does not load (libnvinfer.so.10: cannot open shared object file)").install(monkeypatch)
    with caplog.at_level("WARNING"):
        Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=orin)
    assert {tuple(providers) for _, providers in ort.sessions} == {("CUDAExecutionProvider",)}
    assert [r.getMessage() for r in caplog.records if "TensorRT provider" in r.getMessage()] == [
        "ONNX Runtime lists the TensorRT provider but libnvinfer.so.10 does not load (libnvinfer.so.10: cannot open shared object file): "
        "the graphs run on the CUDA provider (loc3r-doctor says how to fix it)"
    ]


def test_a_tensorrt_provider_session_past_tolerance_runs_on_cuda_instead(
    jetson_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The TensorRT EP's FP16 is checked as the engine build is (layer norms kept FP32, each
    graph against ONNX Runtime FP32): a graph 10% off runs on the CUDA provider."""
    orin = Path(shutil.copytree(jetson_export, tmp_path / "orin"))
    ort = FakeGpuOnnxRuntime(trt_output_scale=1.1).install(monkeypatch)
    with caplog.at_level("WARNING"):
        pipeline = Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=orin)
    assert pipeline.stages.vision.session.get_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert any(options["trt_layer_norm_fp32_fallback"] for path, providers in ort.sessions for name, options in [providers[0]] if name == "TensorrtExecutionProvider")
    warned = [r.getMessage() for r in caplog.records if "on the TensorRT provider (FP16)" in r.getMessage()]
    assert warned and all(re.search(r"is 0\.(09\d*|1\d*) of its output scale away from ONNX Runtime FP32 \(tolerance 0\.02\): it runs on the CUDA provider instead", w) for w in warned)


def test_a_gpu_export_that_would_run_on_the_cpu_is_refused(jetson_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeGpuOnnxRuntime(placed_on=None).install(monkeypatch)  # the providers load, the nodes land on the CPU
    with pytest.raises(ModelError, match=r"cut3r_encoder.onnx: \d+ compute node\(s\) \(.*Conv.*MatMul.*\) run on the CPU although a GPU provider was asked for"):
        Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=jetson_export)


def test_a_gpu_export_on_a_cpu_onnxruntime_is_refused(jetson_export: Path) -> None:
    with pytest.raises(ModelError, match=r"is an export for jetson-orin-agx \(a GPU target\), but this onnxruntime offers only .*CPUExecutionProvider: it would run on the CPU.*--target cpu"):
        Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=jetson_export)


def test_node_placement_is_read_from_a_real_profile(jetson_export: Path, tmp_path: Path) -> None:
    """The placement reader on ONNX Runtime's own profile output (CPU here)."""
    from loc3r.runtime.ort import check_on_gpu, node_placement
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = onnxruntime.InferenceSession(str(jetson_export / "vision.onnx"), options, providers=["CPUExecutionProvider"])
    session.run(None, {"pixels": np.zeros((1, 3, 384, 384), np.float32)})
    placement = node_placement(Path(session.end_profiling()))
    assert placement[("CPUExecutionProvider", "MatMul")] > 0 and placement[("CPUExecutionProvider", "Conv")] == 1
    with pytest.raises(ModelError, match="vision.onnx: .* run on the CPU"):
        check_on_gpu("vision.onnx", placement)
    check_on_gpu("vision.onnx", {("CUDAExecutionProvider", "MatMul"): 3, ("CPUExecutionProvider", "Shape"): 2})
