"""``loc3r-export --encoders int8``: unsigned 8-bit forms of the encoder graphs, each one's
error against FP32 recorded in the manifest and enforced, the choice read back by the runtime."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from loc3r.errors import InternalError, ModelError
from loc3r.export import cli as export_cli
from loc3r.export import exporter, graphs
from loc3r.export.exporter import ExportRequest, export_vision
from loc3r.export.manifest import load_manifest
from loc3r.engines.targets import load_target
from loc3r.models.bundle import load_bundle
from loc3r.models.tiny import resolve_model
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline

ENCODERS = ("cut3r_encoder", "cut3r_step", "vision")


def with_encoders(name: str, default: str):  # noqa: ANN201 - Target
    """Target ``name`` with its profile's default encoder precision set to ``default``."""
    target = load_target(name)
    return dataclasses.replace(target, encoders=dataclasses.replace(target.encoders, default=default))


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export whose int8 comes from the target profile (no --encoders): profile -> manifest."""
    out = tmp_path_factory.mktemp("int8") / "cpu"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("loc3r.engines.targets.load_target", lambda name: with_encoders(name, "int8"))
        assert export_cli.main(["--target", "cpu", "--out", str(out), "--llm", "fp32"]) == 0
    return out


def encoders_asked(argv: list[str], default: str) -> str:
    """The encoder precision the export request gets from ``argv`` with a profile default."""
    from loc3r.export.preflight import export_request

    args = export_cli.export_parser().parse_args(["--target", "cpu", "--out", "o", *argv])
    return export_request(args, with_encoders("cpu", default), load_bundle(resolve_model("tiny")), "none").encoders


def test_the_profile_gives_the_encoders_precision_and_the_flag_overrides_it() -> None:
    assert load_target("cpu").encoders.default == "fp32" and "int8" in load_target("cpu").encoders.available
    assert encoders_asked([], "int8") == "int8" and encoders_asked([], "fp32") == "fp32"
    assert encoders_asked(["--encoders", "fp32"], "int8") == "fp32"
    assert encoders_asked(["--encoders", "int8"], "fp32") == "int8"


def test_encoder_graphs_get_unsigned_int8_forms_with_their_error_recorded(int8_export: Path) -> None:
    manifest = load_manifest(int8_export)
    assert manifest.encoders == "int8" and manifest.precision == "fp32"
    for name in ENCODERS:
        artifact = manifest.artifacts[name]
        int8 = artifact["int8"]
        assert int8["file"] == f"{name}.int8.onnx" and manifest.graph_file(name) == int8_export / int8["file"]
        error = int8["error_vs_fp32"]
        assert error["tolerance"] == artifact["int8_tolerance"] == 5e-2
        assert error["within_tolerance"] and 0 < error["relative"] <= error["tolerance"]  # quantized: not exact, within
        model = onnx.load(str(int8_export / int8["file"]), load_external_data=False)
        ops = {node.op_type for node in model.graph.node}
        assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
        assert "Attention" in ops and artifact["fused_attention"] > 0  # quantized on top of the fused graph
        weights = [i for i in model.graph.initializer if i.name.endswith("_quantized")]
        assert weights and all(w.data_type == onnx.TensorProto.UINT8 for w in weights)  # unsigned, not QInt8
    for name in ("pose_head", "bev_head"):
        assert "int8" not in manifest.artifacts[name] and manifest.graph_file(name) == manifest.artifact_path(name)


def test_the_runtime_runs_the_int8_graphs_close_to_fp32(int8_export: Path, cpu_export: Path, tmp_path: Path) -> None:
    video = write_demo_video(tmp_path / "v.mp4", num_frames=12, width=160, height=120)
    sampling = SamplingConfig(max_new_tokens=2)
    answers = {
        name: Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=engines).ask(video, "Where am I?", num_frames=3, sampling=sampling)
        for name, engines in (("int8", int8_export), ("fp32", cpu_export))
    }
    int8, fp32 = answers["int8"], answers["fp32"]
    assert "encoders INT8" in int8.model.dtype_reason and "INT8" not in fp32.model.dtype_reason
    assert int8.pose.x != fp32.pose.x  # the INT8 graphs ran ...
    assert abs(int8.pose.x - fp32.pose.x) < 0.05 and abs(int8.pose.y - fp32.pose.y) < 0.05  # ... close to FP32


def test_the_encoders_precision_round_trips_through_the_manifest(int8_export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(int8_export, copy)
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    del data["encoders"]  # a manifest from before --encoders: FP32 graphs
    path.write_text(json.dumps(data))
    manifest = load_manifest(copy)
    assert manifest.encoders == "fp32" and manifest.graph_file("vision") == copy / "vision.onnx"
    data["encoders"] = "int4"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="encoders 'int4' is not one of fp32, int8"):
        load_manifest(copy)


def test_an_int8_graph_past_its_tolerance_fails_the_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    strict = graphs.vision_spec

    def spec(*args: object):  # noqa: ANN202 - GraphSpec
        return dataclasses.replace(strict(*args), int8_tolerance=1e-6)

    monkeypatch.setattr(exporter.graphs, "vision_spec", spec)
    request = ExportRequest(load_bundle(resolve_model("tiny")), load_target("cpu"), tmp_path, None, encoders="int8")
    with pytest.raises(InternalError, match=r"vision: the INT8 graph is [0-9.e-]+ of the output scale away from FP32 \(tolerance 1e-06\)"):
        export_vision(request, tmp_path)


def test_the_int8_error_is_the_scaled_error() -> None:
    """What the manifest records: max |error| / max |FP32 value| over the outputs."""
    from loc3r.export.precision import scaled_error

    error = scaled_error([np.array([2.0, -4.0])], [np.array([2.1, -4.0])], 5e-2)
    assert error.relative == pytest.approx(0.1 / 4) and error.within_tolerance
