"""Weight-only int8/int4 (``MatMulNBits``) for the decoder's MatMuls, one weight at a time.

Each weight is quantized on its own by onnxruntime's ``MatMulNBitsQuantizer`` (RTN, the
quantizer onnxruntime-genai's model builder runs) over a one-MatMul model, ``COLUMNS``
output columns at a time (blocks run along K, so columns are independent and the packed
results concatenate along N), and the resulting ``MatMulNBits`` node replaces the MatMul in
the graph. The builder's own pass converts the whole model to one protobuf first (a 7B
model in fp16 is ~14 GiB more); here only one weight and its column slice are resident.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx import helper, numpy_helper

from loc3r.export.root_logger import kept_root_logger

with kept_root_logger():  # that module calls logging.basicConfig(level=INFO) on import
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

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
        [helper.make_tensor_value_info("X", w.data_type, [1, k])],
        [helper.make_tensor_value_info("Y", w.data_type, [1, n])],
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


def quantize_matmuls(model: ir.Model, choose: Callable[[ir.Node], WeightQuant | None], after_each: Callable[[], None]) -> int:
    """Replace each MatMul with a constant weight by ``MatMulNBits`` where ``choose`` says so.

    One weight is read, quantized and dropped at a time, then ``after_each`` runs (e.g. to
    hand the source pages back); returns how many MatMuls were replaced.
    """
    graph = model.graph
    replaced = 0
    for matmul in [node for node in graph if node.op_type == "MatMul"]:
        weight = matmul.inputs[1]
        quant = choose(matmul) if weight is not None and weight.const_value is not None else None
        if quant is None:
            continue
        attrs, consts = _nbits_node(weight.const_value.numpy(), quant)
        inputs = [matmul.inputs[0]]
        for suffix, array in zip(("q", "scales", "zero_points"), consts, strict=False):
            const = ir.Value(name=f"{weight.name}.{suffix}", const_value=ir.tensor(array))
            graph.register_initializer(const)
            inputs.append(const)
        new = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{matmul.name}_Q{quant.bits}")
        ir.convenience.replace_nodes_and_values(graph, matmul, [matmul], [new], list(matmul.outputs), list(new.outputs))
        graph.initializers.pop(weight.name)
        replaced += 1
        after_each()
    if replaced:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return replaced
