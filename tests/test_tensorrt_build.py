"""``loc3r-export build`` without a GPU: names, profiles, the precision mode each TensorRT version
gets, FP32 pins on the real exported graphs, the SM taken at build time, and the check of every
engine against ONNX Runtime FP32, all against the fakes of ``gpu_fakes``."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from gpu_fakes import FakeBuilder, FakeCudart, FakeEngine, FakeTensorRT, install_cudart
from onnx import TensorProto, helper

from loc3r.errors import InputError, ModelError
from loc3r.export import cli as export_cli
from loc3r.export import device_build
from loc3r.export.device_build import build_from_manifest
from loc3r.export.manifest import load_manifest
from loc3r.runtime import tensorrt_backend
from loc3r.export.precision import fp32_nodes
from loc3r.export.tensorrt_build import (
    PrecisionMode,
    Profile,
    check_engine_matches,
    engine_file_name,
    import_tensorrt,
    precision_mode,
    resolve_profile,
    trtexec_command,
)

ROOT = Path(__file__).resolve().parents[1]
SENSITIVE = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Sin", "Cos")


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401

        from loc3r.runtime.cuda import gpu_info

        gpu_info()
        return True
    except (ImportError, InputError):
        return False


@pytest.fixture
def orin(jetson_export: Path, tmp_path: Path) -> Path:
    """A private copy of the Jetson export."""
    return Path(shutil.copytree(jetson_export, tmp_path / "orin"))


def fake_gpu(monkeypatch: pytest.MonkeyPatch, version: str = "10.3.0.30", sm: tuple[int, int] = (8, 7), devices: int = 1) -> FakeTensorRT:
    cudart = install_cudart(monkeypatch, FakeCudart(sm=sm, devices=devices))
    trt = FakeTensorRT(version, cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def without_engine_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests about what is built: skip the (slower) check, tested on its own below."""
    monkeypatch.setattr(device_build, "check_engines", lambda manifest, files: {})


def built_networks(trt: FakeTensorRT) -> dict[str, dict]:
    """Each build the fake recorded, by graph name (from the ONNX file parsed)."""
    return {Path(b["network"].onnx_file).name.split(".")[0]: b for b in trt.built}


# -- names, profiles, modes ----------------------------------------------------------------------


def test_engine_names_carry_tensorrt_version_and_sm() -> None:
    assert engine_file_name("cut3r_step", "10.3.0.30", "87") == "cut3r_step_trt10.3_sm87.engine"
    check_engine_matches(Path("cut3r_step_trt10.3_sm87.engine"), "10.3.0", "87")
    with pytest.raises(ModelError, match="built for another TensorRT/GPU .* TensorRT 10.7.0, sm_87"):
        check_engine_matches(Path("cut3r_step_trt10.3_sm87.engine"), "10.7.0", "87")
    with pytest.raises(ModelError, match="sm_89"):
        check_engine_matches(Path("vision_trt10.3_sm87.engine"), "10.3", "89")


@pytest.mark.parametrize(
    "version, precision, mode",
    [
        ("10.3.0.30", "fp16", PrecisionMode.FP16_STRONG),  # JetPack 6: STRONGLY_TYPED exists since 10.0
        ("9.2.0", "fp16", PrecisionMode.FP16_WEAK),
        ("10.12.0.36", "fp16", PrecisionMode.FP16_STRONG),  # weak typing deprecated
        ("11.0.0", "fp16", PrecisionMode.FP16_STRONG),  # weak typing removed
        ("10.3.0", "fp32", PrecisionMode.FP32),
    ],
)
def test_precision_mode_follows_the_tensorrt_version(version: str, precision: str, mode: str) -> None:
    assert precision_mode(version, precision) == mode


def test_profile_fills_named_axes_and_keeps_fixed_ones() -> None:
    inputs = [{"name": "pixels", "shape": ["frames", 3, 384, 384]}, {"name": "state", "shape": [1, 16, 128]}]
    profile = resolve_profile(inputs, {"frames": (1, 8, 8)})
    assert profile.shapes == {"pixels": ((1, 3, 384, 384), (8, 3, 384, 384), (8, 3, 384, 384))}
    assert profile.contains({"pixels": (3, 3, 384, 384)}) and not profile.contains({"pixels": (9, 3, 384, 384)})
    with pytest.raises(ModelError, match="no optimisation range for axis 'frames' of pixels"):
        resolve_profile(inputs, {})


def test_trtexec_line_repeats_shapes_per_profile_and_builds_strongly_typed() -> None:
    profiles = [Profile({"image": ((1, 3, 8, 16),) * 3}), Profile({"image": ((1, 3, 16, 8),) * 3})]
    line = trtexec_command(Path("enc.fp16.onnx"), Path("enc.engine"), profiles, True, 4096)
    assert shlex.split(line) == [
        "trtexec",
        "--onnx=enc.fp16.onnx",
        "--saveEngine=enc.engine",
        *(f"--{k}Shapes=image:1x3x8x16" for k in ("min", "opt", "max")),
        *(f"--{k}Shapes=image:1x3x16x8" for k in ("min", "opt", "max")),
        "--memPoolSize=workspace:4096M",
        "--timingCacheFile=timing.cache",
        "--skipInference",
        "--stronglyTyped",
    ]
    assert "--stronglyTyped" not in trtexec_command(Path("a.onnx"), Path("a.engine"), [Profile({})], False, 512)


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed")
def test_missing_tensorrt_says_where_to_build() -> None:
    with pytest.raises(InputError, match="TensorRT is not installed here.*loc3r-export build --manifest.*--system-site-packages"):
        import_tensorrt()


def test_device_step_names_the_command(jetson_export: Path) -> None:
    text = export_cli.device_step(load_manifest(jetson_export))
    assert "TensorRT engines are NOT built here" in text and "planned: sm_87" in text
    assert f"loc3r-export build --manifest {jetson_export}/manifest.json" in text


# -- what stays FP32 --------------------------------------------------------------------------------


def test_fp32_nodes_are_the_sensitive_ops_and_everything_off_the_activation_path() -> None:
    """x is an activation, pos a position input: RoPE-like arithmetic on pos and shapes stays
    FP32 with the sensitive ops; the matmul and what mixes activations with it does not."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pos", "freq"], ["angle"], name="angle"),
        helper.make_node("Cos", ["angle"], ["cos"], name="cos"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Mul", ["h", "cos"], ["rotated"], name="rotate"),
        helper.make_node("LayerNormalization", ["rotated", "gamma"], ["y"], name="norm", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("pos", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor(n, TensorProto.FLOAT, d, [1.0] * math.prod(d)) for n, d in (("freq", [4]), ("w", [4, 4]), ("gamma", [4]))],
    )
    kept = [n.name for n in fp32_nodes(helper.make_model(graph), SENSITIVE, ("pos",))]
    assert kept == ["shape", "cast", "angle", "cos", "norm"]


def test_weakly_typed_build_pins_by_layer_type_and_tensor_name(orin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT 10.3: FP16 + obey constraints; on the real exported graphs every sensitive layer
    and every layer off the activation path (RoPE angles, tables) is pinned FP32, no matmul or
    convolution is, and names alone would have pinned nothing (the exporter's node names)."""
    without_engine_check(monkeypatch)
    trt = fake_gpu(monkeypatch, "10.3.0.30")
    build_from_manifest(orin, progress=lambda m: None, mode=PrecisionMode.FP16_WEAK)
    builds = built_networks(trt)
    assert set(builds) == {"cut3r_encoder", "cut3r_step", "vision", "pose_head", "bev_head"}
    for name, build in builds.items():
        assert build["network"].flags == 0 and not build["strong"]
        assert build["config"].flags == {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
        model = onnx.load(str(orin / f"{name}.onnx"), load_external_data=False)
        op_of = {node.name: node.op_type for node in model.graph.node}
        expected = {n.name for n in fp32_nodes(model, SENSITIVE, ("positions",) if name == "cut3r_step" else ())}
        layers = {layer.name: layer for layer in build["network"].layers}
        pinned = set(build["pinned"])
        for layer_name in pinned:
            assert layers[layer_name].precision == trt.float32
            assert set(layers[layer_name].output_types.values()) == {trt.float32}
        float_layers = {n for n, layer in layers.items() if all(o.dtype == trt.float32 for o in layer._outputs)}
        assert pinned == {n for n in expected & float_layers if op_of[n] not in ("Cast", "Shape", "Constant")}
        assert not any(op_of[n] in ("MatMul", "Gemm", "Conv") for n in pinned)
        norms = [n for n, op in op_of.items() if op == "LayerNormalization"]
        assert bool(norms) == (name in ("cut3r_encoder", "cut3r_step", "vision")) and set(norms) <= pinned
        assert not [n for n in norms if fnmatch.fnmatchcase(n, "*LayerNorm*")]  # trtexec-style names miss them
    rope = [n for n in builds["cut3r_step"]["pinned"] if n.startswith("node_mul")]
    assert rope, "the step's RoPE angle products (from the positions input) are pinned"
    encoder = builds["cut3r_encoder"]
    assert len(encoder["config"].profiles) == 2  # landscape and portrait


@pytest.mark.parametrize("version", ["10.3.0.30", "10.12.0.36", "11.0.0"])
def test_strongly_typed_build_from_the_fp16_graphs(version: str, orin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every TensorRT 10.x and 11: no FP16 flag (11 has none: the fake raises if it is
    touched), the FP16 graphs parsed into strongly typed networks, nothing pinned."""
    without_engine_check(monkeypatch)
    trt = fake_gpu(monkeypatch, version)
    manifest = build_from_manifest(orin, progress=lambda m: None)
    for name, build in built_networks(trt).items():
        assert build["network"].onnx_file.endswith(f"{name}.fp16.onnx")
        assert build["network"].flags == 1 << 5 and build["strong"]
        assert build["config"].flags == set() and build["pinned"] == []
    assert manifest.data["engines"]["mode"] == PrecisionMode.FP16_STRONG
    major_minor = ".".join(version.split(".")[:2])
    assert manifest.data["engines"]["files"]["vision"] == f"vision_trt{major_minor}_sm87.engine"


def test_on_tensorrt_10_a_failed_strongly_typed_build_falls_back_to_the_pinned_one(orin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without_engine_check(monkeypatch)
    trt = fake_gpu(monkeypatch, "10.3.0.30")
    real = FakeBuilder.build_serialized_network
    monkeypatch.setattr(FakeBuilder, "build_serialized_network", lambda self, network, config: None if network.flags else real(self, network, config))
    notes: list[str] = []
    manifest = build_from_manifest(orin, progress=notes.append)
    assert notes[0] == "TensorRT 10.3.0.30 on Orin (sm_87): fp16, fp16-strongly-typed (fallback: fp16-weakly-typed)"
    assert "fp16-strongly-typed failed (TensorRT failed to build cut3r_encoder.fp16.onnx); building fp16-weakly-typed instead" in notes
    assert manifest.data["engines"]["mode"] == PrecisionMode.FP16_WEAK
    assert {name for name, b in built_networks(trt).items() if not b["strong"]} == set(manifest.artifacts)
    monkeypatch.setattr(FakeBuilder, "build_serialized_network", lambda self, network, config: None)
    with pytest.raises(ModelError, match="TensorRT failed to build cut3r_encoder.onnx"):  # both fail: the pinned build's error
        build_from_manifest(orin, progress=notes.append)


def test_tensorrt_11_has_no_pinned_fallback(orin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without_engine_check(monkeypatch)
    fake_gpu(monkeypatch, "11.0.0")
    monkeypatch.setattr(FakeBuilder, "build_serialized_network", lambda self, network, config: None)
    with pytest.raises(ModelError, match="TensorRT failed to build cut3r_encoder.fp16.onnx"):
        build_from_manifest(orin, progress=lambda m: None)


def test_the_check_holds_one_graphs_engines_and_session_at_a_time(orin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loc3r.runtime import cuda, ort

    fake_gpu(monkeypatch)
    events: list[str] = []
    real_open, real_close, real_session = ort.open_session, cuda.Device.close, tensorrt_backend.TrtSession.__init__
    monkeypatch.setattr(ort, "open_session", lambda path, *a, **k: events.append(f"session {Path(path).stem}") or real_open(path, *a, **k))
    monkeypatch.setattr(cuda.Device, "close", lambda self: events.append("close") or real_close(self))
    monkeypatch.setattr(tensorrt_backend.TrtSession, "__init__", lambda self, trt, path, device: events.append(f"engine {path.name.split('_trt')[0]}") or real_session(self, trt, path, device))
    build_from_manifest(orin, progress=lambda m: None)
    groups = " ".join(events).split(" close")
    assert [g.strip() for g in groups if g.strip()] == [
        "engine cut3r_encoder engine cut3r_step session cut3r_encoder session cut3r_step",
        "engine bev_head session bev_head",
        "engine pose_head session pose_head",
        "engine vision session vision",
    ]


# -- SM, check, refusals ---------------------------------------------------------------------------


def test_build_takes_the_sm_of_this_gpu(orin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without_engine_check(monkeypatch)
    fake_gpu(monkeypatch, "10.3.0.30", sm=(8, 9))
    notes: list[str] = []
    manifest = build_from_manifest(orin, progress=notes.append)
    assert "note: the export planned sm_87 (jetson-orin-agx); these engines are for sm_89" in notes
    assert manifest.data["engines"]["sm"] == "89" and manifest.data["engines"]["gpu"] == "Orin"
    assert sorted(p.name for p in orin.glob("*.engine")) == sorted(f"{n}_trt10.3_sm89.engine" for n in manifest.artifacts)


def test_every_engine_is_checked_against_onnxruntime_fp32(orin: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The fake FP16 engines round their outputs to float16: the check sees it, within tolerance."""
    fake_gpu(monkeypatch)
    assert export_cli.main(["build", "--manifest", str(orin / "manifest.json")]) == 0
    checks = load_manifest(orin).data["engines"]["check_vs_onnxruntime_fp32"]
    assert set(checks) == {"cut3r_encoder", "cut3r_step", "vision", "pose_head", "bev_head"}
    for check in checks.values():
        assert check["within_tolerance"] and 0 < check["relative"] < 5e-3  # the FP16 graphs, strongly typed
    assert checks["cut3r_step"]["runs"] == 16  # 8 frames at 16:9 and at 9:16
    printed = capsys.readouterr().out
    assert "built 5 TensorRT 10.3.0.30 engines for sm_87" in printed and "cut3r_step_trt10.3_sm87.engine" in printed


def test_an_engine_past_tolerance_fails_the_build_and_leaves_nothing(
    orin: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_gpu(monkeypatch)
    real_init = FakeEngine.__init__

    def drifting(self: FakeEngine, trt: FakeTensorRT, plan: dict) -> None:
        real_init(self, trt, plan)
        if Path(plan["onnx"]).name.startswith("vision."):  # the FP16 graph (strongly typed) and the FP32 one (pinned fallback)
            session, run = self.session, self.session.run
            session.run = lambda names, feeds: [o * 1.1 for o in run(names, feeds)]  # a 10% error

    monkeypatch.setattr(FakeEngine, "__init__", drifting)
    before = (orin / "manifest.json").read_text()
    assert export_cli.main(["build", "--manifest", str(orin / "manifest.json")]) == 2
    err = capsys.readouterr().err
    # 1.1 x an FP16-rounded output: a tenth of the scale, give or take the rounding
    assert re.search(r"the fp16 engine vision_trt10\.3_sm87\.engine is 0\.(09\d+|1) of its output scale away from ONNX Runtime FP32 \(tolerance 0\.02\)", err)
    assert "loc3r-export build --precision fp32" in err
    assert not list(orin.glob("*.engine")) and (orin / "manifest.json").read_text() == before


def test_build_without_a_gpu_or_cuda_is_a_clear_error(orin: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake_gpu(monkeypatch, devices=0)
    assert export_cli.main(["build", "--manifest", str(orin / "manifest.json")]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "cuda", None)  # no cuda-python, and torch here has no CUDA
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    assert export_cli.main(["build", "--manifest", str(orin / "manifest.json")]) == 2
    assert "cuda-python is not installed and torch has no CUDA" in capsys.readouterr().err


def test_a_cpu_export_plans_no_engines(tmp_path: Path, jetson_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu = Path(shutil.copytree(jetson_export, tmp_path / "cpu"))
    data = json.loads((cpu / "manifest.json").read_text())
    data["device_build"], data["target"]["name"] = None, "cpu"
    (cpu / "manifest.json").write_text(json.dumps(data))
    assert export_cli.main(["build", "--manifest", str(cpu / "manifest.json")]) == 2
    assert "plans no TensorRT engines (target cpu)" in capsys.readouterr().err


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
    from loc3r.runtime.demo_video import write_demo_video
    from loc3r.runtime.pipeline import Pipeline

    out = tmp_path / "engines"
    assert export_cli.main(["--target", "x86-cuda", "--out", str(out), "--llm", "none"]) == 0
    assert export_cli.main(["build", "--manifest", str(out / "manifest.json")]) == 0
    video = write_demo_video(tmp_path / "v.mp4", num_frames=8, width=320, height=180)
    ref = Pipeline.from_pretrained("tiny").ask(video, "Where am I?", num_frames=4)
    trt = Pipeline.from_pretrained("tiny", backend="tensorrt", engines=out).ask(video, "Where am I?", num_frames=4)
    assert trt.pose.x == pytest.approx(ref.pose.x, abs=5e-2)
