"""The builder's decoder (cpu fp32 form) against transformers' Qwen2, and OnnxLLM's KV buffers."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from llm_setup import LLM_CHUNK, LLM_CONTEXT
from safetensors.torch import save_file

from loc3r.errors import InputError, ModelError
from loc3r.export.llm import FP32_TOLERANCE, LLMForm, LLMSource, decoder_parity, llm_config_of
from loc3r.export.llm_reference import reference_outputs
from loc3r.export.llm_io import DECODER, EMBEDDINGS
from loc3r.export.mapped_weights import MappedShards
from loc3r.models.llm import TorchLLM
from loc3r.runtime.generate import SamplingConfig, generate
from loc3r.runtime.onnx_llm import OnnxLLM

TOL = FP32_TOLERANCE
Export = tuple[Path, dict]


@pytest.fixture(scope="module")
def exported(llm_exports: dict[str, Export]) -> Export:
    return llm_exports["fp32"]


@pytest.fixture()
def llm(exported: Export) -> OnnxLLM:
    out, _ = exported
    return OnnxLLM(out / DECODER, out / EMBEDDINGS, capacity=LLM_CONTEXT, chunk_tokens=LLM_CHUNK)


def _reference(model: torch.nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        hidden = model.model(inputs_embeds=embeds[None]).last_hidden_state[0]
        return hidden, model.lm_head(hidden[-1])


def _embeds(n: int, seed: int, width: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def test_chunked_prefill_matches_transformers(trained_llm: torch.nn.Module, llm: OnnxLLM) -> None:
    """20 positions run as chunks of 8, 8 and 4 on the shared KV buffers."""
    embeds = _embeds(20, 1, trained_llm.config.hidden_size)
    hidden, logits = _reference(trained_llm, embeds)
    got = llm.prefill(embeds)
    assert got.hidden_states.shape == (20, trained_llm.config.hidden_size)
    assert got.last_logits.shape == (trained_llm.config.vocab_size,)
    torch.testing.assert_close(torch.as_tensor(got.hidden_states), hidden, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.as_tensor(got.last_logits), logits, atol=TOL, rtol=0)


def test_prefill_on_a_cached_prefix_matches_transformers(trained_llm: torch.nn.Module, llm: OnnxLLM) -> None:
    embeds = _embeds(20, 2, trained_llm.config.hidden_size)
    hidden, logits = _reference(trained_llm, embeds)
    first = llm.prefill(embeds[:13])
    second = llm.prefill(embeds[13:])
    assert llm.cached_length == 20
    torch.testing.assert_close(torch.as_tensor(first.hidden_states), hidden[:13], atol=TOL, rtol=0)
    torch.testing.assert_close(torch.as_tensor(second.hidden_states), hidden[13:], atol=TOL, rtol=0)
    torch.testing.assert_close(torch.as_tensor(second.last_logits), logits, atol=TOL, rtol=0)


def test_decode_matches_torch_llm(trained_llm: torch.nn.Module, llm: OnnxLLM) -> None:
    ids = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11]
    reference = TorchLLM(trained_llm, chunk_tokens=4)
    torch.testing.assert_close(torch.as_tensor(llm.prefill(llm.embed(ids)).last_logits), reference.prefill(reference.embed(ids)).last_logits, atol=TOL, rtol=0)
    for token in (7, 300, 1):
        torch.testing.assert_close(torch.as_tensor(llm.decode(token)), reference.decode(token), atol=TOL, rtol=0)


def test_prefix_reuse_gives_the_tokens_of_a_full_recompute(llm: OnnxLLM) -> None:
    video = _embeds(30, 3, llm.table.shape[1])
    greedy = SamplingConfig(max_new_tokens=12)
    questions = [[11, 12, 13, 14], [200, 201, 9], [77]]
    llm.prefill(video)
    reused = []
    for question in questions:
        llm.truncate(30)
        assert llm.cached_length == 30
        reused.append(generate(llm.prefill(llm.embed(question)).last_logits, llm.decode, set(), greedy))
    recomputed = []
    for question in questions:
        llm.reset()
        first = llm.prefill(torch.cat([video, torch.from_numpy(llm.embed(question))])).last_logits
        recomputed.append(generate(first, llm.decode, set(), greedy))
    assert reused == recomputed
    assert all(len(tokens) == 12 for tokens in reused)


def test_kv_is_written_in_place_of_one_buffer_per_layer(llm: OnnxLLM) -> None:
    """Past and present are the same preallocated buffer: a prefill writes its positions
    there, a truncation only moves the length, the next token overwrites the position."""
    buffers = [array for _, array in llm._kv]
    assert len(buffers) == 2 * 2 and all(b.shape == (1, 2, LLM_CONTEXT, 16) for b in buffers)
    llm.prefill(_embeds(10, 4, llm.table.shape[1]))
    key = buffers[0][0]
    assert np.abs(key[:, :10]).min() > 0 and not key[:, 10:].any()
    before = key[:, 6].copy()
    llm.truncate(6)
    assert llm.cached_length == 6 and np.array_equal(key[:, 6], before)  # nothing moved
    llm.decode(3)
    assert llm.cached_length == 7 and not np.array_equal(key[:, 6], before) and not key[:, 10:].any()


def test_context_limit_is_enforced(llm: OnnxLLM) -> None:
    llm.prefill(_embeds(LLM_CONTEXT - 2, 5, llm.table.shape[1]))
    with pytest.raises(InputError, match=f"needs {LLM_CONTEXT + 1} tokens but the exported LLM's context limit is {LLM_CONTEXT}"):
        llm.prefill(_embeds(3, 6, llm.table.shape[1]))
    assert llm.cached_length == LLM_CONTEXT - 2
    assert llm.context_limit == LLM_CONTEXT


def test_graph_is_the_builders_edge_graph(exported: Export) -> None:
    out, fragment = exported
    graph = onnx.load(str(out / DECODER), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    layers = 2
    assert ops.count("GroupQueryAttention") == layers
    assert ops.count("SkipSimplifiedLayerNormalization") >= layers
    assert "Expand" not in ops and "If" not in ops and "Loop" not in ops
    inputs = {t["name"]: t for t in fragment["decoder"]["inputs"]}
    outputs = {t["name"]: t for t in fragment["decoder"]["outputs"]}
    assert set(inputs) == {"inputs_embeds", "attention_mask"} | {f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")}
    assert outputs["logits"]["shape"][1:] == [1, 512]  # the last position only
    assert outputs["hidden_states"]["shape"][-1] == 64
    assert fragment["form"] == {"provider": "cpu", "float": "fp32", "kv_cache": "float32"}
    assert fragment["parity"]["max_abs_hidden"] <= TOL and fragment["parity"]["max_abs_logits"] <= TOL


def test_parity_probe_is_skipped_when_the_decoder_cannot_be_loaded(trained_llm: torch.nn.Module, exported: Export, tmp_path: Path) -> None:
    out, _ = exported
    form = LLMForm("cpu", "fp32", "fp32")
    source = LLMSource.from_model(trained_llm, tmp_path)
    assert decoder_parity(source, out, form, available=1 << 30)["max_abs_logits"] <= TOL
    skipped = decoder_parity(source, out, form, available=1000)
    assert skipped == {"skipped": f"loading the decoder needs {_decoder_bytes(out) / 2**30:.1f} GiB, 0.0 GiB is available here"}


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_the_probe_reference_is_transformers_qwen2_one_layer_at_a_time(trained_llm: torch.nn.Module, tmp_path: Path, tied: bool) -> None:
    """The layer-streamed float32 reference equals the whole transformers model (prefixed
    names as in a bundle; a tied lm_head read from the embedding table)."""
    model = copy.deepcopy(trained_llm)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    weights = {f"llm.{name}": t.detach().contiguous() for name, t in model.state_dict().items()}
    if tied:
        del weights["llm.lm_head.weight"]
    save_file(weights, str(tmp_path / "w.safetensors"))
    embeds = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    want_hidden, want_logits = _reference(model, embeds)
    hidden, logits = reference_outputs(llm_config_of(model), MappedShards([tmp_path / "w.safetensors"]), "llm.", embeds)
    assert hidden.shape == want_hidden.shape and logits.shape == (model.config.vocab_size,)
    assert (hidden - want_hidden).abs().max() <= 1e-5 and (logits - want_logits).abs().max() <= 1e-5


def _decoder_bytes(folder: Path) -> int:
    return (folder / DECODER).stat().st_size + (folder / f"{DECODER}.data").stat().st_size


def test_missing_provider_is_refused(exported: Export) -> None:
    out, _ = exported
    with pytest.raises(ModelError, match="CUDAExecutionProvider"):
        OnnxLLM(out / DECODER, out / EMBEDDINGS, LLM_CONTEXT, LLM_CHUNK, providers=["CUDAExecutionProvider"])


def test_fp32_export_keeps_the_embedding_table_exact(trained_llm: torch.nn.Module, llm: OnnxLLM, exported: Export) -> None:
    ids = [0, 1, 511]
    expected = trained_llm.get_input_embeddings().weight[ids].detach()
    np.testing.assert_array_equal(llm.embed(ids), expected.numpy())
    assert exported[1]["embeddings"]["dtype"] == "float32"


def test_mapped_tensors_read_the_file_and_survive_release(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "b": torch.randn(5), "empty": torch.zeros(0, 2)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    shards = MappedShards([tmp_path / "w.safetensors"])
    views = {name: shards.tensor(name) for name in tensors}
    for name, tensor in tensors.items():
        assert views[name].dtype == tensor.dtype and torch.equal(views[name], tensor)
    shards.release()
    assert torch.equal(views["a"].T.float(), tensors["a"].T.float())  # pages come back from the file
    with pytest.raises(ModelError, match="no tensor 'c'"):
        shards.tensor("c")
