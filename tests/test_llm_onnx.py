"""decoder.onnx (fp32) against transformers' Qwen2, and OnnxLLM's prefix reuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from loc3r.errors import ModelError
from loc3r.export.llm import export_llm
from loc3r.export.llm_graph import export_graph
from loc3r.export.llm_io import DECODER, EMBEDDINGS, DecoderSpec
from loc3r.models.config import LLMConfig
from loc3r.models.llm import TorchLLM, build_qwen2
from loc3r.runtime.generate import SamplingConfig, generate
from loc3r.runtime.onnx_llm import OnnxLLM

CONFIG = LLMConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TOL = DecoderSpec.from_config(CONFIG).tolerance


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_qwen2(CONFIG)


@pytest.fixture(scope="module")
def exported(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("llm_fp32")
    return out, export_llm(model, out, "fp32")


@pytest.fixture()
def llm(exported: tuple[Path, dict]) -> OnnxLLM:
    out, _ = exported
    return OnnxLLM(out / DECODER, out / EMBEDDINGS)


def _reference(model: torch.nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        hidden = model.model(inputs_embeds=embeds[None]).last_hidden_state[0]
        return hidden, model.lm_head(hidden[-1])


def test_prefill_matches_transformers(model: torch.nn.Module, llm: OnnxLLM) -> None:
    embeds = torch.randn(20, CONFIG.hidden_size, generator=torch.Generator().manual_seed(1))
    hidden, logits = _reference(model, embeds)
    got = llm.prefill(embeds)
    assert got.hidden_states.shape == (20, CONFIG.hidden_size)
    assert got.last_logits.shape == (CONFIG.vocab_size,)
    torch.testing.assert_close(got.hidden_states, hidden, atol=TOL, rtol=0)
    torch.testing.assert_close(got.last_logits, logits, atol=TOL, rtol=0)


def test_prefill_with_past_matches_transformers(model: torch.nn.Module, llm: OnnxLLM) -> None:
    embeds = torch.randn(20, CONFIG.hidden_size, generator=torch.Generator().manual_seed(2))
    hidden, logits = _reference(model, embeds)
    first = llm.prefill(embeds[:12])
    second = llm.prefill(embeds[12:])
    assert llm.cached_length == 20
    torch.testing.assert_close(first.hidden_states, hidden[:12], atol=TOL, rtol=0)
    torch.testing.assert_close(second.hidden_states, hidden[12:], atol=TOL, rtol=0)
    torch.testing.assert_close(second.last_logits, logits, atol=TOL, rtol=0)


def test_decode_matches_torch_llm(model: torch.nn.Module, llm: OnnxLLM) -> None:
    ids = [5, 17, 42, 99, 3]
    reference = TorchLLM(model)
    ref_logits = reference.prefill(llm.embed(ids)).last_logits
    got_logits = llm.prefill(llm.embed(ids)).last_logits
    torch.testing.assert_close(got_logits, ref_logits, atol=TOL, rtol=0)
    torch.testing.assert_close(llm.decode(7), reference.decode(7), atol=TOL, rtol=0)


def test_prefix_reuse_gives_the_tokens_of_a_full_recompute(llm: OnnxLLM) -> None:
    gen = torch.Generator().manual_seed(3)
    video = torch.randn(30, CONFIG.hidden_size, generator=gen)
    greedy = SamplingConfig(max_new_tokens=12)
    questions = [[11, 12, 13, 14], [200, 201, 9], [77]]

    llm.prefill(video)
    reused = []
    for question in questions:
        llm.truncate(30)
        assert llm.cached_length == 30
        first = llm.prefill(llm.embed(question)).last_logits
        reused.append(generate(first, llm.decode, set(), greedy))

    recomputed = []
    for question in questions:
        llm.reset()
        first = llm.prefill(torch.cat([video, llm.embed(question)])).last_logits
        recomputed.append(generate(first, llm.decode, set(), greedy))
    assert reused == recomputed
    assert all(len(tokens) == 12 for tokens in reused)


def test_graph_declares_its_interface(exported: tuple[Path, dict], llm: OnnxLLM) -> None:
    out, fragment = exported
    spec = DecoderSpec.from_config(CONFIG)
    assert [i.name for i in llm.session.get_inputs()] == spec.input_names
    assert [o.name for o in llm.session.get_outputs()] == spec.output_names
    assert fragment["decoder"]["outputs"]["logits"]["shape"] == [CONFIG.vocab_size]
    graph = onnx.load(str(out / DECODER), load_external_data=False)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert not [n for n in graph.graph.node if n.op_type in ("If", "Loop")]
    assert fragment["parity"]["max_abs_hidden"] <= TOL


def test_export_streams_weights(model: torch.nn.Module) -> None:
    """Tracing holds no weight: every MatMul weight is read from the model when written."""
    graph, names = export_graph(CONFIG, model.state_dict())
    assert len(names) == 7 * CONFIG.num_hidden_layers + 1
    assert all(isinstance(graph.graph.initializers[n].const_value, ir.LazyTensor) for n in names)


def test_missing_provider_is_refused(exported: tuple[Path, dict]) -> None:
    out, _ = exported
    with pytest.raises(ModelError, match="CUDAExecutionProvider"):
        OnnxLLM(out / DECODER, out / EMBEDDINGS, providers=["CUDAExecutionProvider"])


def test_fp32_export_keeps_the_embedding_table_exact(model: torch.nn.Module, llm: OnnxLLM, exported: tuple[Path, dict]) -> None:
    ids = [0, 1, 255]
    expected = model.get_input_embeddings().weight[ids].detach()
    np.testing.assert_array_equal(llm.embed(ids).numpy(), expected.numpy())
    assert exported[1]["embeddings"]["dtype"] == "float32"
