"""The Qwen2 language model, fed ``inputs_embeds``, with a reusable KV cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

from loc3r.models.config import LLMConfig
from loc3r.runtime.stages import PrefillResult


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

    def load(self, key_states: Tensor, value_states: Tensor, capacity: int) -> None:
        """Hold these states (one copy), in a buffer of at least ``capacity`` positions."""
        self.lazy_initialization(key_states, value_states)
        self._reserve(max(capacity, key_states.shape[-2]), key_states, value_states)
        self._length = 0
        self.update(key_states, value_states)

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
            for chunk in torch.as_tensor(embeds).to(table.device, table.dtype).split(self.chunk_tokens)
        ]
        states = torch.cat(hidden)
        return PrefillResult(states, self.model.lm_head(states[-1]).float())

    def decode(self, token_id: int) -> Tensor:
        """Feed one generated token; logits (vocab,) for the next one."""
        return self.prefill(self.embed([token_id])).last_logits

    @torch.inference_mode()
    def prefill_branches(self, suffixes: list[Tensor]) -> list[Tensor]:
        """Hidden states of each suffix (n_i, width) prefilled on top of the cache as if alone;
        the cache is left as it was. Suffixes are packed into one sequence (as many whole ones
        as fit in ``chunk_tokens`` per forward pass): each attends to the whole cache and to its
        own earlier tokens (a block-diagonal causal mask), with its own positions, so the prefix
        is shared, not copied."""
        prefix = self.cached_length
        table = self.model.get_input_embeddings().weight
        hidden: list[Tensor] = []
        for group in _packed_groups([len(s) for s in suffixes], self.chunk_tokens):
            lengths = [len(suffixes[i]) for i in group]
            embeds = torch.cat([suffixes[i] for i in group]).to(table.device, table.dtype)
            offsets = torch.cat([torch.arange(n, device=table.device) for n in lengths])
            segment = torch.repeat_interleave(torch.arange(len(group), device=table.device), torch.tensor(lengths, device=table.device))
            own = (segment[:, None] == segment[None, :]) & (offsets[:, None] >= offsets[None, :])
            mask = torch.cat((own.new_ones(len(offsets), prefix), own), dim=1)
            try:
                states = self.model.model(
                    inputs_embeds=embeds[None], attention_mask=mask[None, None], position_ids=(prefix + offsets)[None],
                    cache=self.cache, use_cache=True,
                ).last_hidden_state[0]
            finally:
                self.truncate(prefix)
            hidden += list(states.split(lengths))
        return hidden

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (e.g. back to the video)."""
        extra = self.cached_length - length
        if extra < 0:
            raise ValueError(f"cannot truncate a cache of {self.cached_length} tokens to {length}")
        if extra:
            self.cache.crop(-extra)

    def reset(self) -> None:
        self.cache = reserved_cache()

    @property
    def kv_dtype(self) -> str:
        """The cache's dtype (``float32``, ``float16``, ``bfloat16``)."""
        return str(self.model.get_input_embeddings().weight.dtype).removeprefix("torch.")

    @property
    def kv_layout(self) -> tuple[int, int, int, str]:
        """(arrays = 2 x layers, kv heads, head dim, :attr:`kv_dtype`) of :meth:`read_kv`."""
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers, config.num_key_value_heads, head_dim, self.kv_dtype

    def read_kv(self) -> list[np.ndarray]:
        """The cache as host arrays, per layer key then value, each (kv heads, length, head
        dim) in :attr:`kv_dtype` (``bfloat16`` as its bits, ``uint16``)."""
        arrays = []
        for layer in self.cache.layers[: self.model.config.num_hidden_layers]:
            for states in (layer.keys, layer.values):
                host = states[0].detach().to("cpu", copy=True).contiguous()
                arrays.append((host.view(torch.uint16) if host.dtype == torch.bfloat16 else host).numpy())
        return arrays

    @torch.inference_mode()
    def write_kv(self, arrays: list[np.ndarray], spare_tokens: int | None = None) -> None:
        """Replace the cache by ``arrays`` (as :meth:`read_kv` gives; float32 ones are cast to
        the cache's dtype), leaving room for ``spare_tokens`` more (default ``chunk_tokens``)."""
        table = self.model.get_input_embeddings().weight
        self.reset()
        for index in range(0, len(arrays), 2):
            key, value = (_cache_tensor(a, table.dtype).to(table.device)[None] for a in arrays[index : index + 2])
            layer = ReservedLayer()
            layer.load(key, value, key.shape[-2] + (self.chunk_tokens if spare_tokens is None else spare_tokens))
            self.cache.layers.append(layer)


def _packed_groups(lengths: list[int], limit: int) -> list[list[int]]:
    """Indices of ``lengths`` in order, grouped so that each group's total is at most
    ``limit`` (a longer one alone)."""
    groups: list[list[int]] = []
    total = limit + 1
    for index, length in enumerate(lengths):
        if total + length > limit:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += length
    return groups


def _cache_tensor(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A host array of :meth:`TorchLLM.read_kv`'s form as a tensor of ``dtype``."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype == torch.uint16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(dtype)
