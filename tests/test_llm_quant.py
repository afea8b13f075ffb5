"""Quantized decoders (int4 / int8 / fp16) and the torch backend's torchao mode.

The model is a tiny Qwen2 trained for 80 seeded steps on a synthetic Markov chain, so its
next-token distribution is peaked (checked below): top-1 agreement with fp32 means
something, unlike on a random model whose logits are flat.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from loc3r.bench.llm_quant import TINY, greedy_agreement, markov_sequences, peaked_qwen2
from loc3r.errors import ModelError
from loc3r.export import quantize
from loc3r.export.llm import export_llm
from loc3r.export.llm_io import DECODER, EMBEDDINGS
from loc3r.export.llm_torchao import quantize_torch_llm
from loc3r.export.quantize import WeightQuant
from loc3r.models.llm import TorchLLM
from loc3r.runtime.onnx_llm import OnnxLLM

CONFIG = TINY  # the benchmark's trained tiny model
Exports = dict[str, tuple[Path, dict]]
PROMPTS = markov_sequences(CONFIG.vocab_size, 8, 12, seed=99).tolist()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return peaked_qwen2(CONFIG, steps=80, lr=1e-2, batch=8, length=24)


@pytest.fixture(scope="module")
def exports(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Exports:
    out = {}
    for quant in ("fp32", "fp16", "int8", "int4"):
        folder = tmp_path_factory.mktemp(f"llm_{quant}")
        out[quant] = folder, export_llm(model, folder, quant)
    return out


def _open(exports: Exports, quant: str) -> OnnxLLM:
    folder, _ = exports[quant]
    return OnnxLLM(folder / DECODER, folder / EMBEDDINGS)


def test_model_is_not_flat(model: torch.nn.Module) -> None:
    with torch.inference_mode():
        probs = model(input_ids=torch.tensor(PROMPTS)).logits.softmax(-1)
    assert probs.max(-1).values.mean() > 0.4


def test_int4_weight_bytes(exports: Exports) -> None:
    """Counted: initializers feeding the decoder's MatMul/MatMulNBits (layers + lm_head)."""
    fp32 = exports["fp32"][1]["matmul_weight_bytes"]
    assert exports["int4"][1]["matmul_weight_bytes"] <= 0.16 * fp32
    assert exports["int8"][1]["matmul_weight_bytes"] <= 0.30 * fp32
    assert exports["fp16"][1]["matmul_weight_bytes"] == fp32 // 2


def test_int4_greedy_agreement(exports: Exports) -> None:
    reference = _open(exports, "fp32")
    assert greedy_agreement(reference, _open(exports, "int4"), PROMPTS, 16) >= 0.95


# Max |logit error| at the parity probe; this model's logits span ~14 per position.
@pytest.mark.parametrize(("quant", "tol"), [("fp16", 1e-2), ("int8", 0.1), ("int4", 1.5)])
def test_quantized_logits_stay_close(exports: Exports, quant: str, tol: float) -> None:
    parity = exports[quant][1]["parity"]
    assert parity["max_abs_logits"] < tol
    assert parity["top1_match"]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_every_matmul_weight_is_quantized(exports: Exports, quant: str) -> None:
    folder, fragment = exports[quant]
    graph = onnx.load(str(folder / DECODER), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    bits = [a.i for n in nbits for a in n.attribute if a.name == "bits"]
    assert bits == [int(quant[3:])] * (7 * CONFIG.num_hidden_layers + 1)
    assert fragment["quantization"]["block_size"] == 32


def test_torchao_int8_keeps_top1(model: torch.nn.Module) -> None:
    pytest.importorskip("torchao")
    reference = TorchLLM(model)
    quantized = TorchLLM(quantize_torch_llm(copy.deepcopy(model), "int8"))
    assert greedy_agreement(reference, quantized, PROMPTS, 16) >= 0.95


def test_torchao_int4_is_refused_on_cpu(model: torch.nn.Module) -> None:
    pytest.importorskip("torchao")
    with pytest.raises(ModelError, match="int4"):
        quantize_torch_llm(copy.deepcopy(model), "int4")


def test_column_slices_quantize_like_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = np.random.default_rng(0).standard_normal((96, 100)).astype(np.float32)
    for quant in (WeightQuant("int4", 32, False), WeightQuant("int8", 32, True)):
        whole_attrs, whole = quantize._nbits_node(weight, quant)
        monkeypatch.setattr(quantize, "COLUMNS", 24)
        attrs, sliced = quantize._nbits_node(weight, quant)
        monkeypatch.undo()
        assert attrs == whole_attrs
        assert all(np.array_equal(a, b) for a, b in zip(whole, sliced, strict=True))
