"""Export the LLM: ``decoder.onnx`` (+ external data), the fp16 embedding table, a manifest part."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM

from loc3r.export.llm_graph import OPSET, export_graph
from loc3r.export.llm_io import DECODER, EMBED_TENSOR, EMBEDDINGS, DecoderSpec
from loc3r.export.quantize import Quant, WeightQuant, quantize_matmuls
from loc3r.models.config import LLMConfig
from loc3r.runtime.onnx_llm import OnnxLLM

PARITY_TOKENS = 16


def llm_config_of(model: Qwen2ForCausalLM) -> LLMConfig:
    """Our ``LLMConfig`` read back from a transformers Qwen2 config."""
    hf = model.config
    names = [f.name for f in dataclasses.fields(LLMConfig) if hasattr(hf, f.name)]
    values = {name: getattr(hf, name) for name in names}
    rope = getattr(hf, "rope_parameters", None) or {}
    values["rope_theta"] = rope.get("rope_theta", getattr(hf, "rope_theta", LLMConfig.rope_theta))
    return LLMConfig(**values)


def matmul_weight_bytes(decoder_path: str | Path) -> int:
    """Bytes of the initializers that feed MatMul / MatMulNBits (through a Cast for fp16).

    Counts the weight matrices of every decoder layer and of lm_head, with their scales and
    zero points; not the norms, biases or graph constants, nor the embedding table.
    """
    model = onnx.load(str(decoder_path), load_external_data=False)
    graph = model.graph
    cast_source = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    weights: set[str] = set()
    for node in graph.node:
        if node.op_type == "MatMul":
            weights.add(cast_source.get(node.input[1], node.input[1]))
        elif node.op_type == "MatMulNBits":
            weights.update(name for name in node.input[1:] if name)
    total = 0
    for init in graph.initializer:
        if init.name not in weights:
            continue
        external = {e.key: e.value for e in init.external_data}
        total += int(external["length"]) if "length" in external else len(init.raw_data)
    return total


def _plan(names: list[str], layers: WeightQuant, lm_head: WeightQuant) -> dict[str, WeightQuant]:
    return {name: lm_head if name == "lm_head.weight" else layers for name in names}


def _parity(model: Qwen2ForCausalLM, out_dir: Path, spec: DecoderSpec) -> dict[str, Any]:
    """One prefill of seeded token embeddings: ONNX Runtime vs the torch model."""
    seeded = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab, (PARITY_TOKENS,), generator=seeded)
    llm = OnnxLLM(out_dir / DECODER, out_dir / EMBEDDINGS)
    embeds = model.get_input_embeddings()(ids).detach().float()
    got = llm.prefill(embeds)
    with torch.inference_mode():
        hidden = model.model(inputs_embeds=embeds[None]).last_hidden_state[0].float()
        logits = model.lm_head(hidden[-1]).float()
    return {
        "tokens": PARITY_TOKENS,
        "max_abs_hidden": float((got.hidden_states - hidden).abs().max()),
        "max_abs_logits": float((got.last_logits - logits).abs().max()),
        "top1_match": bool(got.last_logits.argmax() == logits.argmax()),
        "tolerance_fp32": spec.tolerance,
    }


def export_llm(
    model: Qwen2ForCausalLM,
    out_dir: str | Path,
    quant: Quant,
    block_size: int = 32,
    symmetric: bool = True,
    lm_head: Quant | None = None,
    accuracy_level: int = 4,
    check: bool = True,
) -> dict[str, Any]:
    """Write the decoder graph and the embedding table (fp32 for fp32, else fp16); return a manifest fragment.

    ``quant`` stores the decoder layers' MatMul weights; ``lm_head`` defaults to the same
    (why: benchmarks/results/llm_quant.md). ``accuracy_level`` is MatMulNBits' CPU compute
    type: 0 computes in fp32 (8-bit weights then decode 15-40x slower than at 4 on this
    machine), 4 quantizes activations to int8 per block; CUDA kernels ignore it. ``check``
    runs one prefill through ONNX Runtime and the torch model and records the differences
    under ``parity``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = llm_config_of(model)
    spec = DecoderSpec.from_config(config)
    graph, names = export_graph(config, model.state_dict())
    head = lm_head or quant
    layers = WeightQuant(quant, block_size, symmetric, accuracy_level)
    plan = _plan(names, layers, WeightQuant(head, block_size, symmetric, accuracy_level))
    quantize_matmuls(graph, plan)
    ir.save(graph, out / DECODER, external_data=f"{DECODER}.data")
    del graph
    # fp32 exports keep the table exact (the CPU reference target); others store it in fp16
    table_dtype = torch.float32 if quant == "fp32" else torch.float16
    table = model.get_input_embeddings().weight.detach().to(table_dtype).contiguous()
    save_file({EMBED_TENSOR: table}, str(out / EMBEDDINGS))
    nbits = quant in ("int8", "int4") or head in ("int8", "int4")
    return {
        "decoder": {
            "file": DECODER,
            "external_data": f"{DECODER}.data",
            "opset": OPSET,
            **spec.io(),
        },
        "embeddings": {
            "file": EMBEDDINGS,
            "tensor": EMBED_TENSOR,
            "shape": [spec.vocab, spec.width],
            "dtype": str(table_dtype).removeprefix("torch."),
        },
        "quantization": {
            "layers": quant,
            "lm_head": head,
            "method": "onnxruntime MatMulNBitsQuantizer (RTN)" if nbits else "cast",
            "block_size": block_size if nbits else None,
            "symmetric": symmetric if nbits else None,
            "accuracy_level": accuracy_level if nbits else None,
        },
        "matmul_weight_bytes": matmul_weight_bytes(out / DECODER),
        "parity": _parity(model, out, spec) if check else None,
        "versions": {
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
        },
    }
