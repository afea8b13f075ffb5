"""The Qwen2 language model, fed ``inputs_embeds``, with a reusable KV cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

from loc3r.models.config import LLMConfig


def qwen2_config(config: LLMConfig) -> Qwen2Config:
    """transformers' config for our LLM section (SDPA attention, our vocab)."""
    return Qwen2Config(**dataclasses.asdict(config), attn_implementation="sdpa")


def build_qwen2(config: LLMConfig) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 with our sizes."""
    return Qwen2ForCausalLM(qwen2_config(config)).eval()


class ReservedLayer(DynamicLayer):
    """A KV cache layer that appends into a buffer with spare room instead of concatenating.

    transformers' ``DynamicLayer`` copies the whole cache on every append, so the first
    question on a long video prefix pays for copying it; here appends write in place (the
    buffer doubles when full) and cutting back to the prefix only moves the length.
    """

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None
        self._length = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + key_states.shape[-2]
        self._reserve(end, key_states, value_states)
        self._key_buffer[..., self._length : end, :] = key_states
        self._value_buffer[..., self._length : end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("pass a negative number of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self._set_length(max(0, self._length + tokens_to_remove))

    def _reserve(self, length: int, key_states: Tensor, value_states: Tensor) -> None:
        capacity = 0 if self._key_buffer is None else self._key_buffer.shape[-2]
        if length <= capacity:
            return
        size = max(length, 2 * capacity)
        buffers = []
        for old, like in ((self._key_buffer, key_states), (self._value_buffer, value_states)):
            new = like.new_empty((*like.shape[:-2], size, like.shape[-1]))
            if old is not None:
                new[..., : self._length, :] = old[..., : self._length, :]
            buffers.append(new)
        self._key_buffer, self._value_buffer = buffers

    def _set_length(self, length: int) -> None:
        self._length = length
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]


def reserved_cache() -> Cache:
    """A KV cache of :class:`ReservedLayer` layers."""
    return Cache(layer_class_to_replicate=ReservedLayer)


@dataclass
class PrefillResult:
    """What one prefill chunk returns."""

    hidden_states: Tensor  # (n, width): final-norm hidden states, what lm_head reads
    last_logits: Tensor  # (vocab,): logits of the chunk's last position


DEFAULT_CHUNK_TOKENS = 512


class TorchLLM:
    """Prefill (``chunk_tokens`` at a time) and decode over one growing KV cache; the cache
    can be cut back to a prefix. The context limit is the model's own."""

    def __init__(self, model: Qwen2ForCausalLM, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.cache = reserved_cache()

    @property
    def cached_length(self) -> int:
        return self.cache.get_seq_length()

    @property
    def context_limit(self) -> int:
        return self.model.config.max_position_embeddings

    def embed(self, ids: list[int] | tuple[int, ...]) -> Tensor:
        """Token embeddings (n, width)."""
        table = self.model.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))

    @torch.inference_mode()
    def prefill(self, embeds: Tensor) -> PrefillResult:
        """Append ``embeds`` (n, width) after what the cache holds, ``chunk_tokens`` at a time
        (moved to the model's device and dtype: other backends' stages hand in float32 CPU tensors)."""
        table = self.model.get_input_embeddings().weight
        hidden = [
            self.model.model(inputs_embeds=chunk.unsqueeze(0), cache=self.cache, use_cache=True).last_hidden_state[0]
            for chunk in embeds.to(table.device, table.dtype).split(self.chunk_tokens)
        ]
        states = torch.cat(hidden)
        return PrefillResult(states, self.model.lm_head(states[-1]).float())

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
        self.cache = reserved_cache()
