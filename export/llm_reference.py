"""The PyTorch reference of the LLM decoder's parity probe, one layer in memory at a time.

transformers' own Qwen2 modules (decoder layer, rotary embedding, RMSNorm) run in float32
on weights read from the same safetensors files the model builder read, a layer at a time:
the probe of a 7B decoder holds one layer (~0.9 GB in float32), not the model (~15 GiB in
bfloat16, which next to the rest of an export came within 1 GiB of the 20 GiB budget).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from loc3r.export.mapped_weights import MappedShards
from loc3r.models.config import LLMConfig
from loc3r.models.llm import qwen2_config

LM_HEAD_ROWS = 16384  # vocabulary rows of lm_head converted to float32 at a time


@torch.inference_mode()
def reference_outputs(config: LLMConfig, shards: MappedShards, prefix: str, embeds: Tensor) -> tuple[Tensor, Tensor]:
    """The last hidden states (T, width) and the last position's logits (vocab,) of the Qwen2
    whose tensors ``shards`` holds under ``prefix``, for ``embeds`` (T, width), in float32."""
    hf = qwen2_config(config)
    hf._attn_implementation = "eager"
    tokens = embeds.shape[0]
    positions = torch.arange(tokens)[None]
    hidden = embeds[None].float()
    rotary = Qwen2RotaryEmbedding(hf)
    position_embeddings = rotary(hidden, positions)
    causal = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None]
    for index in range(hf.num_hidden_layers):
        layer = load_module(Qwen2DecoderLayer, (hf, index), shards, f"{prefix}model.layers.{index}.")
        hidden = layer(hidden, attention_mask=causal, position_ids=positions, position_embeddings=position_embeddings)
        del layer
        shards.release()
    norm = load_module(Qwen2RMSNorm, (hf.hidden_size, hf.rms_norm_eps), shards, f"{prefix}model.norm.")
    states = norm(hidden)[0]
    head = shards.tensor(f"{prefix}{'model.embed_tokens' if hf.tie_word_embeddings else 'lm_head'}.weight")
    last = states[-1]
    logits = torch.cat([head[start : start + LM_HEAD_ROWS].float() @ last for start in range(0, head.shape[0], LM_HEAD_ROWS)])
    shards.release()
    return states, logits


def load_module(kind: type[torch.nn.Module], args: tuple, shards: MappedShards, prefix: str) -> torch.nn.Module:
    """``kind(*args)`` built on the meta device, its parameters read from ``shards`` under
    ``prefix`` and converted to float32."""
    with torch.device("meta"):
        module = kind(*args)
    weights = {name: shards.tensor(prefix + name).float() for name, _ in module.named_parameters()}
    module.load_state_dict(weights, assign=True)
    return module.eval()
