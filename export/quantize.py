"""Weight storage of the decoder's MatMuls: fp32, fp16, or int8/int4 blocks (``MatMulNBits``).

Each weight is quantized on its own by onnxruntime's ``MatMulNBitsQuantizer`` run over a
one-MatMul model, ``COLUMNS`` output columns at a time (blocks run along K, so columns are
independent and the packed results concatenate along N), and the resulting ``MatMulNBits``
node replaces the MatMul in the big graph: only one fp32 weight is materialised at a time
and the quantizer's own copies stay the size of one column slice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

# That module calls logging.basicConfig(level=INFO) on import: keep the root logger as it was.
_root = logging.getLogger()
_handlers, _level = list(_root.handlers), _root.level
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: E402

_root.handlers[:] = _handlers
_root.setLevel(_level)

Quant = Literal["fp32", "fp16", "int8", "int4"]
MS_DOMAIN = "com.microsoft"
COLUMNS = 4096


@dataclass(frozen=True)
class WeightQuant:
    """How one MatMul weight is stored; ``block_size``/``symmetric`` apply to int8/int4."""

    kind: Quant
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}[self.kind]


def _nbits_node(weight: np.ndarray, quant: WeightQuant) -> tuple[dict, list[np.ndarray]]:
    """MatMulNBits attributes and constant inputs (B, scales[, zero points]) for ``weight``."""
    parts = [
        _nbits_slice(np.ascontiguousarray(weight[:, i : i + COLUMNS]), quant)
        for i in range(0, weight.shape[1], COLUMNS)
    ]
    attrs = {**parts[0][0], "N": weight.shape[1]}
    consts = [np.concatenate(arrays) for arrays in zip(*(p[1] for p in parts), strict=True)]
    return attrs, consts


def _nbits_slice(weight: np.ndarray, quant: WeightQuant) -> tuple[dict, list[np.ndarray]]:
    """ORT's quantizer on ``x @ weight`` alone: MatMulNBits attributes and its constant inputs."""
    k, n = weight.shape
    w = numpy_helper.from_array(weight, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
        "one_matmul",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, n])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    quiet = logging.getLogger("onnxruntime.quantization")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=quant.bits,
            block_size=quant.block_size,
            is_symmetric=quant.symmetric,
            accuracy_level=quant.accuracy_level,
        )
        quantizer.process()
    finally:
        quiet.level = level
    out = quantizer.model.model
    (node,) = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    consts = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs, [consts[name] for name in node.input[1:] if name]


def _weight_user(value: ir.Value) -> ir.Node:
    users = [use.node for use in value.uses()]
    if len(users) != 1 or users[0].op_type != "MatMul":
        raise ValueError(f"{value.name} must feed exactly one MatMul, got {users}")
    return users[0]


def _to_nbits(graph: ir.Graph, value: ir.Value, quant: WeightQuant) -> None:
    matmul = _weight_user(value)
    attrs, consts = _nbits_node(value.const_value.numpy(), quant)
    inputs = [matmul.inputs[0]]
    for suffix, array in zip(("q", "scales", "zero_points"), consts, strict=False):
        const = ir.Value(name=f"{value.name}.{suffix}", const_value=ir.tensor(array))
        graph.register_initializer(const)
        inputs.append(const)
    new = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{matmul.name}_nbits")
    ir.convenience.replace_nodes_and_values(
        graph, matmul, [matmul], [new], list(matmul.outputs), list(new.outputs)
    )
    graph.initializers.pop(value.name)


def _to_fp16(graph: ir.Graph, value: ir.Value) -> None:
    """Store the weight as fp16 and cast it back in the graph (weight-only fp16)."""
    matmul = _weight_user(value)
    source = value.const_value
    half = ir.Value(
        name=f"{value.name}.fp16",
        const_value=ir.LazyTensor(
            lambda: ir.tensor(source.numpy().astype(np.float16)), ir.DataType.FLOAT16, value.shape
        ),
    )
    graph.initializers.pop(value.name)
    graph.register_initializer(half)
    cast = ir.node("Cast", [half], {"to": ir.DataType.FLOAT}, name=f"{value.name}.cast")
    graph.insert_before(matmul, cast)
    matmul.replace_input_with(1, cast.outputs[0])


def quantize_matmuls(model: ir.Model, plan: dict[str, WeightQuant]) -> None:
    """Rewrite each named MatMul weight in ``model`` to the storage ``plan`` gives it."""
    graph = model.graph
    for name, quant in plan.items():
        value = graph.initializers[name]
        if quant.kind == "fp16":
            _to_fp16(graph, value)
        elif quant.kind in ("int8", "int4"):
            _to_nbits(graph, value, quant)
    if any(q.kind in ("int8", "int4") for q in plan.values()):
        model.opset_imports[MS_DOMAIN] = 1
