"""The LLM stage over ONNX Runtime: the builder's decoder over one preallocated KV buffer.

Every layer's key and value live in one buffer each, allocated once at the context limit
(on the GPU for the CUDA provider) and bound with io_binding as both ``past_key_values`` and
``present``: ``GroupQueryAttention`` writes the new positions in place, so nothing is copied
per token, and cutting the cache back to the video prefix only moves the length. Prefill
runs in chunks of ``chunk_tokens``, so its transient memory does not grow with the video.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from loc3r.errors import InputError, ModelError
from loc3r.export.llm_io import EMBED_TENSOR, EMBEDS, HIDDEN, KV_KINDS, LOGITS, MASK, past_name, present_name
from loc3r.runtime.arrays import Array, to_numpy
from loc3r.runtime.ort import CPU, open_session, provider_names
from loc3r.runtime.stages import PrefillResult

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_NUMPY_OF = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def kv_geometry(decoder: str | Path) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from the graph's ``GroupQueryAttention`` nodes (reads the
    graph with ``onnx``; the runtime passes the bundle's sizes instead, checked by
    ``check_kv_geometry``, so that a run does not import it)."""
    import onnx

    graph = onnx.load(str(decoder), load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if not attention:
        raise ModelError(f"{decoder} has no GroupQueryAttention node", "re-export the LLM with this loc3r")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attention[0].attribute}
    (hidden,) = [o for o in graph.output if o.name == HIDDEN]
    width = hidden.type.tensor_type.shape.dim[-1].dim_value
    return len(attention), attrs["kv_num_heads"], width // attrs["num_heads"]


def check_kv_geometry(decoder: str | Path, inputs: dict[str, object], layers: int, kv_heads: int) -> None:
    """Refuse a decoder whose KV inputs are not ``layers`` layers of ``kv_heads`` heads."""
    found = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    heads = inputs[past_name(0, "key")].shape[1] if found else None
    if found != layers or heads != kv_heads:
        raise ModelError(
            f"{decoder} has {found} KV layers of {heads} heads, the model has {layers} of {kv_heads}",
            "re-export the LLM from this model with loc3r-export",
        )


class OnnxLLM:
    """Chunked prefill and decode over preallocated KV buffers; cut back to a prefix by length."""

    def __init__(
        self,
        decoder: str | Path,
        embeddings: str | Path,
        capacity: int,
        chunk_tokens: int,
        providers: Sequence[str] = CPU,
        threads: int | None = None,
        geometry: tuple[int, int, int] | None = None,
    ) -> None:
        """``geometry``: (layers, kv heads, head dim) when known (the bundle's config), else
        read from the graph."""
        self.session = open_session(decoder, providers, threads)
        self.table = load_file(str(embeddings))[EMBED_TENSOR]
        if not np.issubdtype(self.table.dtype, np.floating):
            raise ModelError(f"{embeddings} stores the embedding table as {self.table.dtype}, not floating point", "re-run loc3r-export")
        self.capacity, self.chunk_tokens = capacity, chunk_tokens
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._float = _NUMPY_OF[inputs[EMBEDS].type]
        self._kv_float = kv_float = _NUMPY_OF[inputs[past_name(0, "key")].type]
        layers, kv_heads, head_dim = geometry or kv_geometry(decoder)
        check_kv_geometry(decoder, inputs, layers, kv_heads)
        self._kv_heads, self._head_dim = kv_heads, head_dim
        on_gpu = provider_names(providers)[0] in _GPU_PROVIDERS
        self._binding = self.session.io_binding()
        self._bind_outputs()
        self._kv = [
            _kv_buffer((1, kv_heads, capacity, head_dim), kv_float, on_gpu) for _ in range(layers * len(KV_KINDS))
        ]
        for i in range(layers):
            for j, kind in enumerate(KV_KINDS):
                buffer = self._kv[len(KV_KINDS) * i + j][0]
                self._binding.bind_ortvalue_input(past_name(i, kind), buffer)
                self._binding.bind_ortvalue_output(present_name(i, kind), buffer)
        self._length = 0

    @property
    def cached_length(self) -> int:
        return self._length

    @property
    def context_limit(self) -> int:
        return self.capacity

    def embed(self, ids: list[int] | tuple[int, ...]) -> np.ndarray:
        """Token embeddings (n, width), float32."""
        return self.table[np.asarray(ids, dtype=np.int64)].astype(np.float32)

    def prefill(self, embeds: Array) -> PrefillResult:
        """Append ``embeds`` (n, width) after what the cache holds, ``chunk_tokens`` at a time."""
        embeds = to_numpy(embeds)
        end = self._length + embeds.shape[0]
        if end > self.capacity:
            raise InputError(
                f"the prompt needs {end} tokens but the exported LLM's context limit is {self.capacity}",
                "use fewer frames or a shorter question, or re-export with a larger --context-tokens",
            )
        hidden, logits = [], None
        for start in range(0, embeds.shape[0], self.chunk_tokens):
            chunk_hidden, logits = self._run(embeds[start : start + self.chunk_tokens])
            hidden.append(chunk_hidden)
        return PrefillResult(np.concatenate(hidden), logits)

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one generated token; logits (vocab,) for the next one."""
        return self.prefill(self.embed([token_id])).last_logits

    def prefill_branches(self, suffixes: list[Array]) -> list[np.ndarray]:
        """Hidden states of each suffix prefilled on top of the cache, the cache cut back after
        each: one at a time, since ``GroupQueryAttention`` takes only a padding mask (seqlens),
        so several suffixes cannot share the prefix in one run."""
        prefix, hidden = self._length, []
        for suffix in suffixes:
            try:
                hidden.append(self.prefill(suffix).hidden_states)
            finally:
                self._length = prefix
        return hidden

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (only the length moves)."""
        if length > self._length:
            raise ValueError(f"cannot truncate a cache of {self._length} tokens to {length}")
        self._length = length

    def reset(self) -> None:
        self._length = 0

    @property
    def kv_dtype(self) -> str:
        """The KV buffers' dtype (``float32`` for the builder's CPU graphs, ``float16`` for CUDA)."""
        return np.dtype(self._kv_float).name

    @property
    def kv_layout(self) -> tuple[int, int, int, str]:
        """(arrays = 2 x layers, kv heads, head dim, :attr:`kv_dtype`) of :meth:`read_kv`."""
        return len(self._kv), self._kv_heads, self._head_dim, self.kv_dtype

    def read_kv(self) -> list[np.ndarray]:
        """The cache's first ``cached_length`` positions as host arrays, per layer key then
        value, each (kv heads, length, head dim) in :attr:`kv_dtype`."""
        return [
            np.array((host if host is not None else buffer.numpy())[0, :, : self._length]) for buffer, host in self._kv
        ]

    def write_kv(self, arrays: list[np.ndarray]) -> None:
        """Replace the cache by ``arrays`` (as :meth:`read_kv` gives; cast to :attr:`kv_dtype`)."""
        if len(arrays) != len(self._kv):
            raise ValueError(f"{len(arrays)} KV arrays for a cache of {len(self._kv)}")
        length = arrays[0].shape[1]
        if length > self.capacity:
            raise ValueError(f"a {length}-token KV does not fit the context limit of {self.capacity}")
        for (buffer, host), array in zip(self._kv, arrays, strict=True):
            if host is not None:
                host[0, :, :length] = array
            else:  # a device buffer is filled from a host copy of its whole shape (unverified on hardware)
                full = np.zeros(buffer.shape(), dtype=self._kv_float)
                full[0, :, :length] = array
                buffer.update_inplace(full)
        self._length = length

    def _run(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = chunk.shape[0]
        self._binding.bind_cpu_input(EMBEDS, np.ascontiguousarray(chunk[None], dtype=self._float))
        self._binding.bind_cpu_input(MASK, np.ones((1, self._length + n), dtype=np.int64))
        self.session.run_with_iobinding(self._binding)
        logits, hidden = self._binding.get_outputs()[:2]
        self._bind_outputs()  # fresh ones: a bound output keeps its shape for the next run
        self._length += n
        return hidden.numpy()[0].astype(np.float32, copy=False), logits.numpy().astype(np.float32, copy=False).reshape(-1)


    def _bind_outputs(self) -> None:
        """Logits and hidden states, allocated by the run on the host (bound first: outputs 0, 1)."""
        self._binding.bind_output(LOGITS, "cpu")
        self._binding.bind_output(HIDDEN, "cpu")


def _kv_buffer(shape: tuple[int, ...], dtype: type, on_gpu: bool) -> tuple[ort.OrtValue, np.ndarray | None]:
    """One KV buffer: on the GPU, or a host array touched now so that it is really resident."""
    if on_gpu:
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0), None
    array = np.empty(shape, dtype=dtype)
    array.fill(0)
    return ort.OrtValue.ortvalue_from_numpy(array), array
