"""The decoder graph's interface: file and tensor names shared by the exporter and the runtime.

The decoder is onnxruntime-genai's model builder's Qwen2 graph built with
``exclude_embeds``, ``include_hidden_states`` and ``prune_lm_head``:

- inputs: ``inputs_embeds`` (1, n, width); ``attention_mask`` (1, past + n) int64, all ones
  (the positions and the past length are derived from it); ``past_key_values.{i}.key|value``
  (1, kv_heads, capacity, head_dim);
- outputs: ``logits`` (1, 1, vocab) of the last position only; ``hidden_states``
  (1, n, width) after the final norm; ``present.{i}.key|value``, which share the past's
  buffer (``GroupQueryAttention`` writes the n new positions in place).

Float tensors are fp32 for the CPU form and fp16 for the CUDA form. Light on purpose (no
torch / onnx imports): the runtime reads it too.
"""

from __future__ import annotations

LLM_DIR = "llm"  # the LLM's files, relative to the export folder
DECODER = "decoder.onnx"
EMBEDDINGS = "embeddings.safetensors"
EMBED_TENSOR = "embed_tokens"  # the tensor in embeddings.safetensors
EMBEDS = "inputs_embeds"
MASK = "attention_mask"
LOGITS = "logits"
HIDDEN = "hidden_states"
KV_KINDS = ("key", "value")


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"
