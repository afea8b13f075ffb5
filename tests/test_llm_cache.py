"""TorchLLM's reserved KV cache: appends in place, cuts back, equals one full prefill."""

from __future__ import annotations

import torch

from loc3r.models.config import LLMConfig
from loc3r.models.llm import TorchLLM, build_qwen2

CONFIG = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_chunked_prefill_with_cutbacks_equals_one_prefill() -> None:
    torch.manual_seed(0)
    model = build_qwen2(CONFIG)
    llm = TorchLLM(model)
    embeds = llm.embed(list(range(40)))
    with torch.inference_mode():
        reference = model.model(inputs_embeds=embeds[None]).last_hidden_state[0]
    llm.prefill(embeds[:7])
    llm.prefill(embeds[7:31])  # grows the buffer past its first size
    llm.truncate(12)  # back to a prefix, then a different continuation and back again
    llm.prefill(torch.randn(5, CONFIG.hidden_size))
    llm.truncate(12)
    tail = llm.prefill(embeds[12:])
    assert llm.cached_length == 40
    torch.testing.assert_close(tail.hidden_states, reference[12:], rtol=0, atol=1e-5)


def test_cut_back_keeps_the_buffer() -> None:
    torch.manual_seed(0)
    llm = TorchLLM(build_qwen2(CONFIG))
    llm.prefill(llm.embed(list(range(64))))
    buffer = llm.cache.layers[0]._key_buffer
    llm.truncate(50)
    llm.prefill(llm.embed([1, 2, 3]))
    assert llm.cache.layers[0]._key_buffer is buffer  # no reallocation, no copy of the prefix
    assert llm.cached_length == 53
