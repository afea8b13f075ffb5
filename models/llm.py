"""The Qwen2 language model, fed ``inputs_embeds``, with a reusable KV cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from loc3r.models.config import LLMConfig


def qwen2_config(config: LLMConfig) -> Qwen2Config:
    """transformers' config for our LLM section (SDPA attention, our vocab)."""
    return Qwen2Config(**dataclasses.asdict(config), attn_implementation="sdpa")


def build_qwen2(config: LLMConfig) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 with our sizes."""
    return Qwen2ForCausalLM(qwen2_config(config)).eval()


@dataclass
class PrefillResult:
    """What one prefill chunk returns."""

    hidden_states: Tensor  # (n, width): final-norm hidden states, what lm_head reads
    last_logits: Tensor  # (vocab,): logits of the chunk's last position


class TorchLLM:
    """Prefill and decode over one growing KV cache; the cache can be cut back to a prefix."""

    def __init__(self, model: Qwen2ForCausalLM) -> None:
        self.model = model
        self.cache = DynamicCache()

    @property
    def cached_length(self) -> int:
        return self.cache.get_seq_length()

    def embed(self, ids: list[int] | tuple[int, ...]) -> Tensor:
        """Token embeddings (n, width)."""
        table = self.model.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))

    @torch.inference_mode()
    def prefill(self, embeds: Tensor) -> PrefillResult:
        """Append ``embeds`` (n, width) after what the cache holds."""
        out = self.model.model(
            inputs_embeds=embeds.unsqueeze(0), cache=self.cache, use_cache=True
        )
        hidden = out.last_hidden_state[0]
        return PrefillResult(hidden, self.model.lm_head(hidden[-1]).float())

    def decode(self, token_id: int) -> Tensor:
        """Feed one generated token; logits (vocab,) for the next one."""
        return self.prefill(self.embed([token_id])).last_logits

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (e.g. back to the video)."""
        extra = self.cached_length - length
        if extra < 0:
            raise ValueError(f"cannot truncate a cache of {self.cached_length} tokens to {length}")
        if extra:
            self.cache.crop(-extra)

    def reset(self) -> None:
        self.cache = DynamicCache()
