"""The torch backend's quantized mode: torchao weight-only quantization of the Qwen2 linears.

Only int8 runs on CPU with torchao 0.18 (the release that works with torch 2.13): its
``Int4WeightOnlyConfig`` packs for CUDA/XPU only ("plain" needs the mslk GPU kernels,
"plain_int32" rejects CPU), so int4 is refused on CPU rather than silently falling back.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from loc3r.errors import ModelError

TorchQuant = Literal["int8", "int4"]


def quantize_torch_llm(model: nn.Module, mode: TorchQuant) -> nn.Module:
    """Quantize ``model``'s linear weights in place (weight-only); returns it.

    Embeddings stay as they are; lm_head is a linear and is quantized with the rest.
    """
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ModelError(
            "the torch backend's quantized mode needs torchao", "pip install torchao"
        ) from None
    if mode == "int8":
        quantize_(model, Int8WeightOnlyConfig())
        return model
    if mode == "int4":
        raise ModelError(
            "torchao 0.18 has no CPU kernel for int4 weight-only (its int4 layouts are CUDA/XPU)",
            "use mode='int8' for the torch backend, or the onnxruntime backend's int4 decoder",
        )
    raise ModelError(f"unknown torch quantization mode {mode!r}", "use 'int8' or 'int4'")
