"""loc3r-export: ONNX graphs with parity, manifest, device build plan, atomicity, refusal."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from loc3r.errors import InputError, ModelError
from loc3r.export import cli as export_cli
from loc3r.export import exporter, graphs
from loc3r.export.manifest import load_manifest
from loc3r.export.memory_plan import onnx_file_bytes
from loc3r.fileio import OUTPUT_MARKER, write_marker
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline

FRAMES = 3


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("v") / "v.mp4", num_frames=16, width=160, height=120)


def test_manifest_describes_every_artifact(cpu_export: Path) -> None:
    manifest = load_manifest(cpu_export)
    assert set(manifest.artifacts) == {"cut3r_encoder", "cut3r_step", "vision", "pose_head", "bev_head"}
    assert manifest.data["opset"] >= 17 and manifest.precision == "fp32"
    assert manifest.data["model"]["id"] == "loc3r-tiny-random-v1"
    for name, artifact in manifest.artifacts.items():
        assert (cpu_export / artifact["file"]).is_file()
        assert artifact["parity"]["within_tolerance"] is True
        assert artifact["parity"]["max_abs"] <= artifact["tolerance"]["atol"] + artifact["tolerance"]["rtol"] * 10
        assert {t["name"] for t in artifact["inputs"]} and {t["name"] for t in artifact["outputs"]}
    for name in ("cut3r_encoder", "cut3r_step", "vision"):  # weights as ONNX external data, hashed in the manifest's files
        data = manifest.artifacts[name]["external_data"]
        assert data == manifest.artifacts[name]["file"] + ".data"
        listed = manifest.files[data]
        assert hashlib.sha256((cpu_export / data).read_bytes()).hexdigest() == listed["sha256"]
        assert (cpu_export / data).stat().st_size == listed["size"] > (cpu_export / manifest.artifacts[name]["file"]).stat().st_size
    assert manifest.artifacts["cut3r_step"]["parity"]["runs"] == exporter.RECURRENCE_FRAMES + 3 * exporter.SHORT_RECURRENCE_FRAMES
    assert manifest.artifacts["vision"]["inputs"][0]["shape"] == ["frames", 3, 384, 384]
    assert manifest.artifacts["vision"]["outputs"][0]["shape"] == ["frames", 210, 64]
    assert manifest.artifacts["cut3r_encoder"]["inputs"][0]["shape"] == ["frames", 3, "height", "width"]
    assert manifest.artifacts["cut3r_encoder"]["outputs"][0]["shape"] == ["frames", "patches", 128]
    assert [t["shape"] for t in manifest.artifacts["cut3r_step"]["inputs"][:2]] == [[1, "patches", 128], ["patches", 2]]
    assert manifest.artifacts["cut3r_step"]["inputs"][4] == {"name": "first_frame", "shape": [1], "dtype": "float32"}
    assert manifest.data["cut3r_input"] == {"long_side": 512, "min_short_side": 128, "patch": 16}
    assert manifest.data["llm"]["quantization"]["layers"] == "fp32"
    assert set(manifest.data["tools"]) >= {"torch", "onnx", "onnxruntime"}
    assert manifest.data["device_build"] is None  # the cpu target builds no engines


def test_manifest_records_the_memory_plan_of_the_written_files(cpu_export: Path) -> None:
    manifest = load_manifest(cpu_export)
    plan = manifest.data["memory_plan"]
    items = {i["name"]: i["bytes"] for i in plan["items"]}
    llm = manifest.data["llm"]
    decoder = cpu_export / llm["decoder"]["file"]
    assert items["weights: llm decoder"] == decoder.stat().st_size + (cpu_export / llm["decoder"]["external_data"]).stat().st_size
    assert items["weights: llm embedding table"] == (cpu_export / llm["embeddings"]["file"]).stat().st_size
    assert items["weights: vision"] == onnx_file_bytes(cpu_export / "vision.onnx")  # graph + external data
    assert items["KV cache (fp32, 8192 tokens)"] == 2 * 2 * 2 * 16 * 8192 * 4  # tiny: 2 layers, 2 KV heads of 16
    assert plan["total_bytes"] == sum(items.values()) and plan["fits"] and plan["source"] == "measured from the written files"
    assert llm["context_tokens"] == 8192 and llm["prefill_chunk_tokens"] == 512


def test_the_context_limit_is_enforced_at_run_time(cpu_export: Path, video: Path) -> None:
    from loc3r.runtime.onnx_llm import OnnxLLM

    pipeline = Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=cpu_export)
    assert pipeline.stages.llm.context_limit == 8192
    llm = load_manifest(cpu_export).data["llm"]
    pipeline.stages.llm = OnnxLLM(cpu_export / llm["decoder"]["file"], cpu_export / llm["embeddings"]["file"], capacity=500, chunk_tokens=64)
    with pytest.raises(InputError, match="context limit is 500 tokens"):
        pipeline.ask(video, "Where am I?", num_frames=FRAMES)


def test_cut3r_graphs_match_torch_at_every_aspect_ratio(cpu_export: Path) -> None:
    """Parity at 4:3, 16:9, 9:16 and 1:1 at the model's long side (the 8-frame recurrence at
    16:9, two frames at the others), and the ONNX files name their dynamic axes as the manifest does."""
    manifest = load_manifest(cpu_export)
    sizes = {"4:3": "384x512", "16:9": "288x512", "9:16": "512x288", "1:1": "512x512"}
    steps = {"4:3": 2, "16:9": 8, "9:16": 2, "1:1": 2}
    for name in ("cut3r_encoder", "cut3r_step"):
        by_aspect = manifest.artifacts[name]["parity_by_aspect"]
        assert {aspect: r["size"] for aspect, r in by_aspect.items()} == sizes
        runs = {aspect: r["runs"] for aspect, r in by_aspect.items()}
        assert runs == (dict.fromkeys(sizes, 1) if name == "cut3r_encoder" else steps)
        for result in by_aspect.values():
            assert result["within_tolerance"] and result["max_abs"] < 1e-3
    graph = onnx.load(str(cpu_export / "cut3r_encoder.onnx"), load_external_data=False)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.graph.input, *graph.graph.output)]
    assert dims == [["frames", 3, "height", "width"], ["frames", "patches", 128], ["patches", 2]]


def test_only_the_step_keeps_its_arena(cpu_export: Path) -> None:
    """CUT3R's step, run once per frame at one shape, keeps ONNX Runtime's CPU arena, so its
    blocks are reused frame after frame; the batched graphs (CUT3R's encoder, the vision
    tower), the heads and the LLM run without it, so a fresh process does not keep a whole
    batch's or a prefill's activations (``runtime.ort.session_options``). Every session
    has spinning off."""
    stages = Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=cpu_export).stages
    sessions = {
        "cut3r_encoder": stages.camera.encoder,
        "cut3r_step": stages.camera.step_session,
        "vision": stages.vision.session,
        "pose_head": stages.heads.pose_session,
        "llm": stages.llm.session,
    }
    arena = {name: s.get_session_options().enable_cpu_mem_arena for name, s in sessions.items()}
    assert arena == {"cut3r_encoder": False, "cut3r_step": True, "vision": False, "pose_head": False, "llm": False}
    spinning = [s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") for s in sessions.values()]
    assert spinning == ["0"] * 5


@pytest.mark.parametrize("width, height", [(160, 120), (320, 180), (180, 320)], ids=["4:3", "16:9", "9:16"])
def test_onnxruntime_backend_matches_torch(
    cpu_export: Path, tmp_path: Path, width: int, height: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default export runs landscape, widescreen and portrait video, and every stage of
    the onnxruntime backend runs in ONNX Runtime: each graph of the manifest (CUT3R's
    encoder and step, the vision tower, the pose head, the LLM decoder) is run by an
    ``InferenceSession``, and no PyTorch module runs a forward pass during the question.

    Mutation checked: ``onnx_stages`` returning the bundle's torch CUT3R, heads or LLM
    (e.g. ``TorchLLM(bundle.load_parts(("llm",)).llm)`` for the LLM) while the answer still
    matches: the graph it replaces is never run and a torch forward is seen, so this fails.
    """
    import onnxruntime

    video = write_demo_video(tmp_path / "v.mp4", num_frames=16, width=width, height=height)
    sampling = SamplingConfig(max_new_tokens=8)
    ref = Pipeline.from_pretrained("tiny").ask(video, "Where am I?", num_frames=FRAMES, sampling=sampling)
    graphs_run: set[str] = set()
    for method in ("run", "run_with_iobinding"):
        original = getattr(onnxruntime.InferenceSession, method)

        def recording(session, *args, _original=original, **kwargs):  # noqa: ANN001, ANN202
            graphs_run.add(Path(session._model_path).name)
            return _original(session, *args, **kwargs)

        monkeypatch.setattr(onnxruntime.InferenceSession, method, recording)
    pipeline = Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=cpu_export)
    torch_modules: set[str] = set()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, _: torch_modules.add(type(m).__name__))
    try:
        ort = pipeline.ask(video, "Where am I?", num_frames=FRAMES, sampling=sampling)
    finally:
        hook.remove()
    manifest = load_manifest(cpu_export)
    expected = {manifest.artifacts[n]["file"] for n in ("cut3r_encoder", "cut3r_step", "vision", "pose_head")}
    expected.add(Path(manifest.data["llm"]["decoder"]["file"]).name)
    assert expected <= graphs_run
    assert torch_modules == set()
    assert ort.model.backend == "onnxruntime"
    assert ort.token_ids == ref.token_ids
    for field in ("x", "y", "sigma", "theta_rad"):
        assert getattr(ort.pose, field) == pytest.approx(getattr(ref.pose, field), abs=1e-4)


def test_jetson_export_plans_the_llm_within_its_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "orin"
    assert export_cli.main(["--target", "jetson-orin", "--out", str(out), "--context-tokens", "4096"]) == 0
    printed = capsys.readouterr().out
    assert "int4 layers, lm_head fp16, cuda form, KV float16 for 4096 tokens" in printed
    llm = load_manifest(out).data["llm"]
    assert llm["form"] == {"provider": "cuda", "float": "fp16", "kv_cache": "float16"} and llm["quantization"]["block_size"] == 128
    plan = {i["name"]: i["bytes"] for i in load_manifest(out).data["memory_plan"]["items"]}
    assert plan["KV cache (fp16, 4096 tokens)"] == 2 * 2 * 2 * 16 * 4096 * 2
    assert plan["weights: vision"] == onnx_file_bytes(out / "vision.onnx") // 2  # an fp16 engine
    assert "TensorRT engines are NOT built here" in printed
    assert f"loc3r-export build --manifest {out}/manifest.json" in printed


def test_jetson_export_plans_the_device_build(jetson_export: Path) -> None:
    out = jetson_export
    manifest = load_manifest(out)
    assert manifest.precision == "fp16"
    plan = manifest.data["device_build"]
    assert plan["sm"] == "87" and plan["trt_version"] == "10.3"
    engine = plan["engines"]["vision"]
    assert engine["engine"] == "vision_trt10.3_sm87.engine"
    assert engine["profiles"] == [{"pixels": [[1, 3, 384, 384], [8, 3, 384, 384], [8, 3, 384, 384]]}]
    line = shlex.split(engine["trtexec"])
    assert "--onnx=vision.fp16.onnx" in line and "--stronglyTyped" in line and "--minShapes=pixels:1x3x384x384" in line
    # CUT3R: a landscape and a portrait profile (square frames in both), tuned for 16:9
    assert plan["engines"]["cut3r_encoder"]["profiles"] == [
        {"image": [[1, 3, 128, 512], [8, 3, 288, 512], [8, 3, 512, 512]]},
        {"image": [[1, 3, 512, 128], [8, 3, 512, 288], [8, 3, 512, 512]]},
    ]
    assert plan["engines"]["cut3r_step"]["profiles"] == [
        {"features": [[1, 256, 128], [1, 576, 128], [1, 1024, 128]], "positions": [[256, 2], [576, 2], [1024, 2]]}
    ]
    # FP16 graphs beside the FP32 ones, their error against PyTorch recorded
    for name, artifact in manifest.artifacts.items():
        fp16 = artifact["fp16"]
        assert fp16["file"] == f"{name}.fp16.onnx" and (out / fp16["file"]).is_file()
        assert fp16["error_vs_fp32"]["within_tolerance"] and 0 < fp16["error_vs_fp32"]["relative"] < artifact["fp16_tolerance"]


def test_build_without_tensorrt_is_a_clear_error(cpu_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    orin = tmp_path / "orin"
    shutil.copytree(cpu_export, orin)
    manifest = json.loads((orin / "manifest.json").read_text())
    assert export_cli.main(["build", "--manifest", str(orin / "manifest.json")]) == 2
    assert "plans no TensorRT engines" in capsys.readouterr().err
    manifest["device_build"] = {"sm": "87", "trt_version": "10.3", "engines": {}}
    (orin / "manifest.json").write_text(json.dumps(manifest))
    assert export_cli.main(["build", "--manifest", str(orin / "manifest.json")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed here" in err and "on the target device" in err


def test_failed_export_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engines"
    out.mkdir()
    (out / "manifest.json").write_text("previous export")
    write_marker(out, "export")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter, "export_vision", fail)
    assert export_cli.main(["--target", "cpu", "--out", str(out), "--llm", "none"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]
    assert (out / "manifest.json").read_text() == "previous export" and (out / OUTPUT_MARKER).is_file()


def test_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert export_cli.main(["--target", "cpu", "--out", str(tmp_path)]) == 2
    assert "is a folder loc3r did not write (it holds notes.txt); it would be replaced" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_runtime_refuses_a_manifest_for_another_model(cpu_export: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(cpu_export, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["checksum"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="were exported from model .* not from loc3r-tiny-random-v1"):
        Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=other)


def test_parity_tolerance_scales_with_the_output() -> None:
    """atol applies per unit of the output's magnitude once it exceeds 1 (CUT3R's memory grows
    to tens over a recurrence, and CroCo's float16 rounding of q/k flips by one step between
    two correct implementations); outputs within [-1, 1] keep the plain atol."""
    import numpy as np
    import torch

    from loc3r.export.graphs import GraphSpec, TensorSpec
    from loc3r.export.onnx_export import compare

    spec = GraphSpec("g", (), (TensorSpec("y", (3,)),), atol=1e-4, rtol=1e-3)
    large = torch.tensor([50.0, 0.0, -3.0])
    assert compare(spec, [large], [large.numpy() + np.float32([0.0, 9e-4, 0.0])]).within_tolerance
    assert not compare(spec, [large], [large.numpy() + np.float32([0.0, 6e-3, 0.0])]).within_tolerance
    small = torch.tensor([1.0, 0.0, -0.5])
    assert not compare(spec, [small], [small.numpy() + np.float32([0.0, 9e-4, 0.0])]).within_tolerance


def test_frames_outside_the_served_sizes_are_refused(cpu_export: Path) -> None:
    """Wider than 4:1, or a long side other than the model's: one clear line, before running."""
    camera = Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=cpu_export).stages.camera
    for size in ((112, 512), (512, 96), (384, 480)):
        with pytest.raises(InputError, match=rf"a {size[0]}x{size[1]} CUT3R input is outside what the export serves .* no wider than 4:1"):
            camera.encode(torch.zeros(1, 3, *size))


@pytest.mark.parametrize(
    "long_side, min_short, sizes",
    [
        (512, 128, {"4:3": (384, 512), "16:9": (288, 512), "9:16": (512, 288), "1:1": (512, 512)}),
        (224, 64, {"4:3": (160, 224), "16:9": (112, 224), "9:16": (224, 112), "1:1": (224, 224)}),
        (500, 128, {"4:3": (368, 496), "16:9": (272, 496), "9:16": (496, 272), "1:1": (496, 496)}),  # floored to the patch
    ],
)
def test_cut3r_sizes_keep_the_long_side_and_floor_the_short_one(long_side: int, min_short: int, sizes: dict) -> None:
    served = graphs.ImageSizes.for_model(long_side, 16)
    assert served.min_short_side == min_short
    assert {label: served.aspect(*ratio) for label, ratio in graphs.PARITY_ASPECTS.items()} == sizes
    served.check(min_short, served.long_side)
    with pytest.raises(InputError, match="outside what the export serves"):
        served.check(min_short - 16, served.long_side)
