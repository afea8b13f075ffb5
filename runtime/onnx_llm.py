"""The LLM stage over ONNX Runtime: ``decoder.onnx`` with an explicit, reusable KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from torch import Tensor

from loc3r.export.llm_io import (
    EMBED_TENSOR,
    EMBEDS,
    HIDDEN,
    LOGITS,
    POSITIONS,
    past_name,
    present_name,
)
from loc3r.models.llm import PrefillResult
from loc3r.runtime.ort import open_session

_DEVICE_OF = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


class OnnxLLM:
    """Prefill and decode over one growing KV cache held as ORT values; cut back to a prefix."""

    def __init__(
        self,
        decoder: str | Path,
        embeddings: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        self.session = open_session(decoder, providers, threads)
        self.table = load_file(str(embeddings))[EMBED_TENSOR]
        self.device = _DEVICE_OF.get(providers[0], "cpu")
        names = {i.name: i for i in self.session.get_inputs()}
        self.layers = sum(1 for name in names if name.endswith(".key"))
        _, self.kv_heads, _, self.head_dim = names[past_name(0, "key")].shape
        self.reset()

    @property
    def cached_length(self) -> int:
        return self._length

    def embed(self, ids: list[int] | tuple[int, ...]) -> Tensor:
        """Token embeddings (n, width), float32 from the fp16 table."""
        return self.table[torch.tensor(ids, dtype=torch.long)].float()

    def prefill(self, embeds: Tensor) -> PrefillResult:
        """Append ``embeds`` (n, width) after what the cache holds."""
        n = embeds.shape[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(EMBEDS, np.ascontiguousarray(embeds.detach().float().numpy()[None]))
        positions = np.arange(self._length, self._length + n, dtype=np.int64)[None]
        binding.bind_cpu_input(POSITIONS, positions)
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                binding.bind_ortvalue_input(past_name(i, kind), self._past[2 * i + j])
        binding.bind_output(LOGITS, "cpu")
        binding.bind_output(HIDDEN, "cpu")
        for i in range(self.layers):
            for kind in ("key", "value"):
                binding.bind_output(present_name(i, kind), self.device)
        self.session.run_with_iobinding(binding)
        logits, hidden, *present = binding.get_outputs()
        self._past = present
        self._length += n
        return PrefillResult(
            torch.from_numpy(hidden.numpy()[0]), torch.from_numpy(logits.numpy())
        )

    def decode(self, token_id: int) -> Tensor:
        """Feed one generated token; logits (vocab,) for the next one."""
        return self.prefill(self.embed([token_id])).last_logits

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (e.g. back to the video)."""
        if length >= self._length:
            return
        self._past = [
            self._ort_value(np.ascontiguousarray(value.numpy()[:, :, :length]))
            for value in self._past
        ]
        self._length = length

    def reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        self._past = [self._ort_value(empty) for _ in range(2 * self.layers)]
        self._length = 0

    def _ort_value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.device)
