"""FP16 forms of the exported graphs and how far reduced precision lands from FP32.

What stays FP32 is decided once, here, from the ONNX graph itself: the op types the graph
declares sensitive (``GraphSpec.fp32_ops``: normalisation, softmax, reductions, trig) and
every node off the activation path, i.e. computed from shapes, constants and position
inputs alone (RoPE angles and their cos/sin tables). The strongly typed build parses the
FP16 graph written from this set; the weakly typed build (TensorRT < 10.12) pins the same
tensors, by name, to FP32 (``tensorrt_build``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from loc3r.errors import InternalError
from loc3r.export.graphs import GraphSpec

FP16_SUFFIX = ".fp16.onnx"
SHAPE_OPS = ("Shape", "Size")


def fp32_nodes(model: onnx.ModelProto, fp32_ops: Sequence[str], position_inputs: Sequence[str]) -> list[onnx.NodeProto]:
    """Nodes that must compute in FP32: the sensitive op types, and every node no activation
    flows into (a graph input that is not a position input is an activation; ``Shape``
    reads only a tensor's size, so it ends the flow)."""
    activations = {value.name for value in model.graph.input if value.name not in position_inputs}
    keep = []
    for node in model.graph.node:
        on_path = node.op_type not in SHAPE_OPS and any(name in activations for name in node.input)
        if on_path:
            activations.update(node.output)
        if not on_path or node.op_type in fp32_ops:
            keep.append(node)
    return keep


def fp32_tensor_names(onnx_file: Path, fp32_ops: Sequence[str], position_inputs: Sequence[str]) -> frozenset[str]:
    """Output tensor names of ``fp32_nodes`` (TensorRT's parser keeps ONNX tensor names)."""
    model = onnx.load(str(onnx_file), load_external_data=False)
    return frozenset(name for node in fp32_nodes(model, fp32_ops, position_inputs) for name in node.output)


def write_fp16(onnx_file: Path, spec: GraphSpec) -> Path:
    """``graph.fp16.onnx`` beside ``graph.onnx``: FP16 weights and compute, FP32 inputs and
    outputs, ``fp32_nodes`` left in FP32 (casts at the boundaries), for strongly typed builds."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(onnx_file))
    for index, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
    keep = [node.name for node in fp32_nodes(model, spec.fp32_ops, spec.position_inputs)]
    converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True, op_block_list=list(spec.fp32_ops), node_block_list=keep))
    converted.topological_sort()  # the converter appends its input casts after their readers
    del converted.model.graph.value_info[:]  # intermediate types it left behind are stale
    path = onnx_file.with_name(onnx_file.name.removesuffix(".onnx") + FP16_SUFFIX)
    onnx.save(converted.model, str(path), save_as_external_data=True, location=path.name + ".data")  # as the FP32 graph
    onnx.checker.check_model(str(path))
    return path


@dataclass(frozen=True)
class ScaledError:
    """Worst error of a reduced-precision run against FP32, relative to each output's scale.

    ``relative`` is the largest, over outputs, of max |error| / max |FP32 value|: FP16 keeps
    about three significant digits of the largest values, so the error is judged against
    them rather than element by element (small elements carry large relative errors).
    """

    max_abs: float
    relative: float
    runs: int
    tolerance: float

    @property
    def within_tolerance(self) -> bool:
        return self.relative <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs,
            "relative": self.relative,
            "runs": self.runs,
            "tolerance": self.tolerance,
            "within_tolerance": self.within_tolerance,
        }


def scaled_error(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], tolerance: float) -> ScaledError:
    """One run's ``ScaledError`` over matching outputs."""
    max_abs = relative = 0.0
    for ref, got in zip(expected, actual, strict=True):
        ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
        if ref.shape != got.shape:
            raise InternalError(f"output shapes differ: {got.shape} vs the FP32 {ref.shape}")
        error = float(np.abs(ref - got).max(initial=0.0))
        max_abs = max(max_abs, error)
        relative = max(relative, error / max(float(np.abs(ref).max(initial=0.0)), 1e-12))
    return ScaledError(max_abs, relative, 1, tolerance)


def merge_scaled(results: Sequence[ScaledError]) -> ScaledError:
    """The worst of several runs."""
    return ScaledError(
        max(r.max_abs for r in results), max(r.relative for r in results), sum(r.runs for r in results), results[0].tolerance
    )
