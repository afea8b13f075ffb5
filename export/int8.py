"""INT8 forms of the encoder graphs for ONNX Runtime CPU targets (``loc3r-export --encoders int8``).

ONNX Runtime's dynamic quantization: every MatMul with a constant weight becomes
``DynamicQuantizeLinear`` + ``MatMulInteger`` with **unsigned** 8-bit weights and
activations (``QuantType.QUInt8``). The signed default (``QInt8`` weights) is unusable
here: it gave 0.42 of the output scale on CUT3R's camera tokens where unsigned weights give
1.9e-2 (issue 26's measurement on the small preset). How far each INT8 graph lands from
FP32 is measured at export and recorded in the manifest beside its file, like the FP16
error; past the graph's ``int8_tolerance`` the export fails.
"""

from __future__ import annotations

import logging
from pathlib import Path

from loc3r.export.root_logger import kept_root_logger

INT8_SUFFIX = ".int8.onnx"
#: frames sampled from each ``--calibration`` video (TensorRT targets' calibrated int8, ``export/qdq.py``)
CALIBRATION_FRAMES_PER_VIDEO = 16
#: the encoder graphs that get an INT8 form (the heads are a few small MatMuls)
INT8_GRAPHS = ("cut3r_encoder", "cut3r_step", "vggt_encode", "vision")


def int8_path(onnx_file: Path) -> Path:
    return onnx_file.with_name(onnx_file.name.removesuffix(".onnx") + INT8_SUFFIX)


def write_int8(onnx_file: Path) -> Path:
    """``graph.int8.onnx`` (+ ``.data``) beside ``graph.onnx``: MatMul weights and activations
    in unsigned 8 bits (dynamic, per tensor), FP32 inputs and outputs."""
    path = int8_path(onnx_file)
    with kept_root_logger(logging.ERROR):  # the quantizer configures and logs to the root logger
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            onnx_file,
            path,
            weight_type=QuantType.QUInt8,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
    return path
