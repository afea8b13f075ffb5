"""Quantized decoders (int8 / int4, CPU and GPU forms) and the torch backend's torchao mode.

The model is a tiny Qwen2 trained for 80 seeded steps on a synthetic Markov chain, so its
next-token distribution is peaked (checked below): top-1 agreement with fp32 means
something, unlike on a random model whose logits are flat.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from llm_setup import LLM_CHUNK, LLM_CONTEXT

from loc3r.bench.llm_quant import TINY, greedy_agreement, markov_sequences
from loc3r.engines.targets import load_target
from loc3r.errors import InputError, ModelError
from loc3r.export import quantize
from loc3r.export.llm import LLMForm, llm_form
from loc3r.export.llm_io import DECODER, EMBEDDINGS
from loc3r.export.llm_torchao import quantize_torch_llm
from loc3r.export.memory_plan import predicted_decoder_bytes
from loc3r.export.quantize import WeightQuant
from loc3r.models.llm import TorchLLM
from loc3r.runtime.onnx_llm import OnnxLLM

CONFIG = TINY  # the benchmark's trained tiny model
Exports = dict[str, tuple[Path, dict]]
PROMPTS = markov_sequences(CONFIG.vocab_size, 8, 12, seed=99).tolist()


def _open(exports: Exports, name: str) -> OnnxLLM:
    folder, _ = exports[name]
    return OnnxLLM(folder / DECODER, folder / EMBEDDINGS, LLM_CONTEXT, LLM_CHUNK)


def _initializers(folder: Path) -> list[onnx.TensorProto]:
    return list(onnx.load(str(folder / DECODER), load_external_data=False).graph.initializer)


def test_model_is_not_flat(trained_llm: torch.nn.Module) -> None:
    with torch.inference_mode():
        probs = trained_llm(input_ids=torch.tensor(PROMPTS)).logits.softmax(-1)
    assert probs.max(-1).values.mean() > 0.4


def test_int4_weight_bytes(llm_exports: Exports) -> None:
    """Counted: initializers feeding the decoder's MatMul/MatMulNBits (layers + lm_head)."""
    fp32 = llm_exports["fp32"][1]["matmul_weight_bytes"]
    assert llm_exports["int4"][1]["matmul_weight_bytes"] <= 0.16 * fp32
    assert llm_exports["int8"][1]["matmul_weight_bytes"] <= 0.30 * fp32
    assert llm_exports["int4-cuda"][1]["matmul_weight_bytes"] <= 0.16 * fp32  # fp16 scales: smaller still


@pytest.mark.parametrize("name", ["fp32", "int8", "int4", "int4-cuda"])
def test_memory_plan_predicts_the_decoder_size(llm_exports: Exports, name: str) -> None:
    """The plan's prediction from the config: every initializer byte, up to the graph's few
    small constants (shape and index tensors)."""
    folder, fragment = llm_exports[name]
    q = fragment["quantization"]
    form = LLMForm(fragment["form"]["provider"], q["layers"], q["lm_head"], q["block_size"] or 32, True, q["accuracy_level"])
    stored = sum(
        int({e.key: e.value for e in t.external_data}.get("length", len(t.raw_data))) for t in _initializers(folder)
    )
    predicted = predicted_decoder_bytes(CONFIG, form)
    assert 0 <= stored - predicted <= 256


def test_int4_greedy_agreement(llm_exports: Exports) -> None:
    reference = _open(llm_exports, "fp32")
    assert greedy_agreement(reference, _open(llm_exports, "int4"), PROMPTS, 16) >= 0.95
    assert greedy_agreement(reference, _open(llm_exports, "int4-cuda"), PROMPTS, 16) >= 0.95


# Max |logit error| at the parity probe; this model's logits span ~14 per position.
@pytest.mark.parametrize(("name", "tol"), [("int8", 0.1), ("int4", 1.5), ("int4-cuda", 1.5)])
def test_quantized_logits_stay_close(llm_exports: Exports, name: str, tol: float) -> None:
    parity = llm_exports[name][1]["parity"]
    assert parity["max_abs_logits"] < tol
    assert parity["top1_match"]


@pytest.mark.parametrize("name", ["int8", "int4", "int4-cuda"])
def test_every_matmul_weight_is_quantized(llm_exports: Exports, name: str) -> None:
    folder, fragment = llm_exports[name]
    graph = onnx.load(str(folder / DECODER), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    bits = [a.i for n in nbits for a in n.attribute if a.name == "bits"]
    assert bits == [int(fragment["quantization"]["layers"][3:])] * (5 * CONFIG.num_hidden_layers + 1)  # q, k, v packed in one
    assert fragment["quantization"]["block_size"] == 32


def test_gpu_form_is_an_edge_graph_whose_fp16_weights_stay_fp16(llm_exports: Exports, tmp_path: Path) -> None:
    """The GPU targets' form: GQA + MatMulNBits, fp16 I/O and KV, no Expand; and ONNX Runtime
    keeps its weights as stored when it loads and optimizes the graph (checked on the CPU
    provider, the one here: it fuses each layer's fp16 q/k/v bias into MatMulNBits as fp32,
    1-D and a few KiB at 7B; no matrix is widened)."""
    folder, fragment = llm_exports["int4-cuda"]
    graph = onnx.load(str(folder / DECODER), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == CONFIG.num_hidden_layers and ops["MatMulNBits"] and not ops["Expand"]
    assert fragment["form"] == {"provider": "cuda", "float": "fp16", "kv_cache": "float16"}
    stored = {t.name: t for t in graph.initializer}
    assert {onnx.TensorProto.DataType.Name(t.data_type) for t in stored.values()} == {"FLOAT16", "UINT8"}

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(folder / DECODER), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    assert not [n for n in optimized.node if n.op_type == "Expand"]
    widened = [t for t in optimized.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert all(len(t.dims) == 1 and t.name.endswith("qkv_proj.Add.bias") for t in widened)
    matrices = [t for t in optimized.initializer if len(t.dims) >= 2]  # packed int4, fp16 scales, rotary tables
    assert len(matrices) >= 2 * ops["MatMulNBits"]
    assert all(t.data_type == stored[t.name].data_type for t in matrices)


def test_target_forms() -> None:
    """--llm on each target maps onto the builder's forms; fp16 has no CPU form."""
    orin = llm_form(load_target("jetson-orin"), "int4")
    assert (orin.provider, orin.float_type, orin.layers, orin.lm_head, orin.block_size) == ("cuda", "fp16", "int4", "fp16", 128)
    nano = llm_form(load_target("orin-nano"), "int4")
    assert (nano.lm_head, nano.accuracy_level) == ("int4", None)
    cpu = llm_form(load_target("cpu"), "fp32")
    assert (cpu.provider, cpu.float_type, cpu.lm_head) == ("cpu", "fp32", "fp32")
    cpu_int4 = llm_form(load_target("cpu"), "int4")
    assert (cpu_int4.float_type, cpu_int4.lm_head, cpu_int4.accuracy_level) == ("fp32", "int4", 4)
    assert llm_form(load_target("jetson-orin"), "fp32").float_type == "fp32"
    with pytest.raises(InputError, match="--llm fp16 has no CPU form"):
        llm_form(load_target("cpu"), "fp16")


def test_torchao_int8_keeps_top1(trained_llm: torch.nn.Module) -> None:
    pytest.importorskip("torchao")
    reference = TorchLLM(trained_llm)
    quantized = TorchLLM(quantize_torch_llm(copy.deepcopy(trained_llm), "int8"))
    assert greedy_agreement(reference, quantized, PROMPTS, 16) >= 0.95


def test_torchao_int4_is_refused_on_cpu(trained_llm: torch.nn.Module) -> None:
    pytest.importorskip("torchao")
    with pytest.raises(ModelError, match="int4"):
        quantize_torch_llm(copy.deepcopy(trained_llm), "int4")


def test_column_slices_quantize_like_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16):
        weight = rng.standard_normal((96, 100)).astype(dtype)
        for quant in (WeightQuant("int4", 32, False), WeightQuant("int8", 32, True)):
            whole_attrs, whole = quantize._nbits_node(weight, quant)
            monkeypatch.setattr(quantize, "COLUMNS", 24)
            attrs, sliced = quantize._nbits_node(weight, quant)
            monkeypatch.undo()
            assert attrs == whole_attrs
            assert whole[1].dtype == dtype  # scales in the weight's float type
            assert all(np.array_equal(a, b) for a, b in zip(whole, sliced, strict=True))
