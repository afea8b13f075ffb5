"""CPU exports write attention as fused ONNX ``Attention`` nodes (opset 23); the fused graphs
match PyTorch within their recorded tolerance, the manifest says so, and a fused graph past
its tolerance fails the export. TensorRT targets keep opset 18 without them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from loc3r.engines.targets import load_target
from loc3r.errors import InternalError
from loc3r.export import exporter, graphs
from loc3r.export.camera_parity import SessionRunner, TorchRunner, fixed_images, run_recurrence
from loc3r.export.exporter import ExportRequest, export_cut3r
from loc3r.export.manifest import load_manifest
from loc3r.export.onnx_export import FUSED_ATTENTION_OPSET, OPSET, compare
from loc3r.models.bundle import load_bundle
from loc3r.models.tiny import resolve_model
from loc3r.runtime.ort import open_session

CUT3R = ("cut3r_encoder", "cut3r_step")


def attention_nodes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(node.op_type == "Attention" for node in model.graph.node)


def test_cpu_export_records_fused_attention_in_its_manifest(cpu_export: Path) -> None:
    manifest = load_manifest(cpu_export)
    assert manifest.data["opset"] == FUSED_ATTENTION_OPSET == 23
    for name in (*CUT3R, "vision"):
        artifact = manifest.artifacts[name]
        count = attention_nodes(cpu_export / artifact["file"])
        assert count > 0 and artifact["fused_attention"] == count
        assert artifact["parity"]["within_tolerance"]
    step = onnx.load(str(cpu_export / "cut3r_step.onnx"), load_external_data=False)
    assert [o.version for o in step.opset_import if o.domain in ("", "ai.onnx")] == [23]


def test_tensorrt_targets_keep_opset_18_without_fused_attention(jetson_export: Path) -> None:
    manifest = load_manifest(jetson_export)
    assert manifest.data["opset"] == OPSET == 18
    for name in CUT3R:
        assert manifest.artifacts[name]["fused_attention"] == 0 == attention_nodes(jetson_export / f"{name}.onnx")


def test_fused_step_camera_tokens_match_torch_over_a_recurrence(cpu_export: Path) -> None:
    """Fresh frames at a size the export did not check (3:2 -> 336x512 at the tiny long side),
    six steps, each side carrying its own state: every step's outputs within the step's tolerance."""
    model = load_bundle(resolve_model("tiny")).load_parts(("camera_encoder", "heads"), torch.float32)
    torch_side = TorchRunner(graphs.CameraEncoderGraph(model.camera_encoder).eval(), graphs.CameraStepGraph(model.camera_encoder, model.heads).eval())
    onnx_side = SessionRunner(*(open_session(cpu_export / f"{name}.onnx") for name in CUT3R))
    init = load_manifest(cpu_export)
    state = init.float_tensors(init.value("artifacts", "cut3r_step", "initial_state"))
    long_side = init.data["cut3r_input"]["long_side"]
    images = fixed_images(6, (long_side * 2 // 3 // 16 * 16, long_side), seed=99)
    want, got = (run_recurrence(side, images, state["state"], state["memory"]) for side in (torch_side, onnx_side))
    spec = graphs.camera_step_spec(1, (1,), (1,), 1)  # the step's tolerance (shapes unused by compare)
    for expected, actual in zip(want.steps, got.steps, strict=True):
        result = compare(spec, expected, actual)
        assert result.within_tolerance, result
    cameras = np.stack([s[0] for s in got.steps])
    assert np.abs(cameras - np.stack([s[0] for s in want.steps])).max() < 1e-4 and np.abs(cameras).max() > 1e-2  # not all zero


def test_a_fused_graph_past_its_tolerance_fails_the_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    strict = graphs.camera_step_spec

    def spec(*args: object):  # noqa: ANN202 - GraphSpec
        return dataclasses.replace(strict(*args), atol=0.0, rtol=0.0)

    monkeypatch.setattr(exporter.graphs, "camera_step_spec", spec)
    request = ExportRequest(load_bundle(resolve_model("tiny")), load_target("cpu"), tmp_path, None)
    assert request.opset == FUSED_ATTENTION_OPSET
    with pytest.raises(InternalError, match=r"cut3r_step: ONNX Runtime differs from PyTorch by [0-9.e-]+ abs / [0-9.e-]+ rel \(tolerance 0 abs or 0 rel\)"):
        export_cut3r(request, tmp_path)
    assert attention_nodes(tmp_path / "cut3r_step.onnx") > 0  # the graph it refused was the fused one
