"""The decoder graph's interface, declared once: names, symbolic shapes, dtypes, tolerance.

Light on purpose (no torch / onnx imports): the runtime reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loc3r.models.config import LLMConfig

DECODER = "decoder.onnx"
EMBEDDINGS = "embeddings.safetensors"
EMBED_TENSOR = "embed_tokens"  # the tensor in embeddings.safetensors
EMBEDS = "inputs_embeds"
POSITIONS = "position_ids"
LOGITS = "logits"
HIDDEN = "hidden_states"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class DecoderSpec:
    """The decoder graph's interface: names, symbolic shapes, dtypes, parity tolerance."""

    layers: int
    width: int
    kv_heads: int
    head_dim: int
    vocab: int
    tolerance: float = 1e-4

    @classmethod
    def from_config(cls, config: LLMConfig) -> DecoderSpec:
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.num_key_value_heads,
            config.head_dim,
            config.vocab_size,
        )

    @property
    def input_names(self) -> list[str]:
        kv = [past_name(i, kind) for i in range(self.layers) for kind in ("key", "value")]
        return [EMBEDS, POSITIONS, *kv]

    @property
    def output_names(self) -> list[str]:
        kv = [present_name(i, kind) for i in range(self.layers) for kind in ("key", "value")]
        return [LOGITS, HIDDEN, *kv]

    def io(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Inputs and outputs with symbolic shapes and dtypes (a manifest fragment)."""
        kv_in = [1, self.kv_heads, "past", self.head_dim]
        kv_out = [1, self.kv_heads, "past + n", self.head_dim]
        inputs = {EMBEDS: ([1, "n", self.width], "float32"), POSITIONS: ([1, "n"], "int64")}
        outputs = {LOGITS: ([self.vocab], "float32"), HIDDEN: ([1, "n", self.width], "float32")}
        for i in range(self.layers):
            for kind in ("key", "value"):
                inputs[past_name(i, kind)] = (kv_in, "float32")
                outputs[present_name(i, kind)] = (kv_out, "float32")

        def table(entries: dict[str, tuple[list, str]]) -> dict[str, dict[str, Any]]:
            return {k: {"shape": shape, "dtype": dtype} for k, (shape, dtype) in entries.items()}

        return {"inputs": table(inputs), "outputs": table(outputs)}
