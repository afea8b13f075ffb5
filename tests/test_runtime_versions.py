"""The manifest records the oldest ONNX Runtime each graph runs on; an older runtime is refused
in one line before any session is created (ONNX Runtime's version is faked: only one build
is installed here)."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime
import pytest
from onnx import helper

from loc3r.errors import InputError
from loc3r.export.manifest import load_manifest
from loc3r.export.runtime_versions import check_onnxruntime, minimum_onnxruntime
from loc3r.runtime import cli as run_cli
from loc3r.runtime.pipeline import Pipeline


def model(opset: int, gqa_inputs: int = 0) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    if gqa_inputs:
        nodes.append(helper.make_node("GroupQueryAttention", [f"i{k}" for k in range(gqa_inputs)], ["z"], domain="com.microsoft"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize(
    "opset, gqa, expected",
    [(18, 0, ("1.20", "loc3r's floor (opset <= 21)")), (22, 0, ("1.21", "opset 22")), (22, 11, ("1.21", "opset 22")), (22, 12, ("1.23", "GroupQueryAttention with 12 inputs")),
     (23, 0, ("1.23", "opset 23"))],
)
def test_minimum_follows_opset_and_attention_inputs(opset: int, gqa: int, expected: tuple[str, str]) -> None:
    assert minimum_onnxruntime(model(opset, gqa)) == expected


def test_the_export_records_each_graphs_minimum(cpu_export: Path) -> None:
    section = load_manifest(cpu_export).data["runtime_minimums"]
    assert section["llm"]["onnxruntime"] == "1.23" and section["llm"]["onnxruntime_why"] == "GroupQueryAttention with 12 inputs"
    assert section["llm"]["tensorrt"] is None
    graphs = ("cut3r_encoder", "cut3r_step", "vision", "pose_head", "bev_head")  # opset 23 on CPU targets (fused attention)
    assert {(section[n]["onnxruntime"], section[n]["onnxruntime_why"]) for n in graphs} == {("1.23", "opset 23")}
    assert section["vision"]["tensorrt"] is None  # a CPU target builds no engine


def test_a_gpu_export_records_the_tensorrt_floor(jetson_export: Path) -> None:
    section = load_manifest(jetson_export).data["runtime_minimums"]
    assert {entry["tensorrt"] for entry in section.values()} == {"10.3"} and "llm" not in section


def test_check_names_the_graph_and_the_version() -> None:
    section = {"vision": {"onnxruntime": "1.20"}, "llm": {"onnxruntime": "1.23", "onnxruntime_why": "GroupQueryAttention with 12 inputs"}}
    check_onnxruntime(section, ["vision", "llm"], "1.23.0")
    check_onnxruntime(section, ["vision"], "1.20.1")
    check_onnxruntime(None, ["llm"], "1.17.0")  # an export without the section is not checked here
    with pytest.raises(InputError) as caught:
        check_onnxruntime(section, ["vision", "llm"], "1.22.0")
    assert caught.value.problem == "ONNX Runtime 1.22.0 is older than 1.23, which the export's llm graph needs (GroupQueryAttention with 12 inputs)"
    assert caught.value.fix == "pip install 'onnxruntime>=1.23' (or onnxruntime-gpu>=1.23; see loc3r-doctor)"


def test_an_older_runtime_is_refused_before_any_session(cpu_export: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    created: list[str] = []
    real = onnxruntime.InferenceSession

    def counting(path: str, *args: object, **kwargs: object) -> object:
        created.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    monkeypatch.setattr(onnxruntime, "__version__", "1.22.0")
    with pytest.raises(InputError, match=r"older than 1\.23, which the export's vision graph needs \(opset 23\)"):  # every graph needs 1.23 on CPU
        Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=cpu_export)
    monkeypatch.setattr(onnxruntime, "__version__", "1.19.2")  # older than every graph: the highest need is named
    from loc3r.runtime.demo_video import write_demo_video

    video = write_demo_video(tmp_path / "v.mp4", num_frames=4, width=64, height=48)  # a missing video is refused earlier
    capsys.readouterr()
    code = run_cli.main([str(video), "Where am I?", "--backend", "onnxruntime", "--engines", str(cpu_export)])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
    assert created == [] and code == 2
    assert err == [
        "loc3r-run: error: ONNX Runtime 1.19.2 is older than 1.23, which the export's vision graph needs (opset 23): "
        "pip install 'onnxruntime>=1.23' (or onnxruntime-gpu>=1.23; see loc3r-doctor)"
    ]
