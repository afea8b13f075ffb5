"""Build ``decoder.onnx`` with onnxruntime-genai's model builder, in a process of its own.

Run as ``python -m loc3r.export.llm_build SPEC.json`` by :mod:`loc3r.export.llm` (the
builder puts its own top-level modules, ``builder``, ``builders``, ``quantization``..., on
``sys.path`` and prints freely, so it stays out of the exporter's process).

The builder's Qwen2 graph is used as it is (``GroupQueryAttention`` over a KV buffer shared
by past and present, ``SkipSimplifiedLayerNormalization``, rotary embedding inside the
attention, ``exclude_embeds`` / ``include_hidden_states`` / ``prune_lm_head``); two things
differ from its command line, both for memory at 7B:

- weights come from the bundle's safetensors files memory-mapped in place
  (:class:`~loc3r.export.mapped_weights.MappedShards`, names under a prefix such as
  ``llm.``), not from ``AutoModelForCausalLM.from_pretrained``, which holds the whole model;
  after each weight is written or quantized its pages are handed back;
- int8/int4 weights are quantized one at a time (:func:`loc3r.export.quantize.quantize_matmuls`,
  the same ORT quantizer the builder calls) instead of the builder's pass over the whole
  model converted to one protobuf.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loc3r.export.llm_io import DECODER, LOGITS
from loc3r.export.quantize import Quant, WeightQuant
from loc3r.models.config import LLMConfig

Provider = Literal["cpu", "cuda"]
BUILDER_OPTIONS = {"exclude_embeds": True, "include_hidden_states": True, "prune_lm_head": True, "filename": DECODER}


@dataclass(frozen=True)
class BuildSpec:
    """Everything the builder process needs (JSON-serialisable)."""

    config: dict[str, Any]  # LLMConfig fields
    files: list[str]  # safetensors files holding the LLM's tensors
    prefix: str  # the LLM's tensor names are ``prefix + <transformers' Qwen2ForCausalLM name>``
    out_dir: str
    provider: Provider  # the builder's execution provider: its graph's float type and kernels
    float_type: Literal["fp32", "fp16"]
    layers: Quant
    lm_head: Quant
    block_size: int
    symmetric: bool
    accuracy_level: int | None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> BuildSpec:
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def weight_quant(self, is_lm_head: bool) -> WeightQuant | None:
        """How a MatMul's weight is stored: None keeps the graph's float type."""
        kind = self.lm_head if is_lm_head else self.layers
        if kind not in ("int8", "int4"):
            return None
        return WeightQuant(kind, self.block_size, self.symmetric, self.accuracy_level)


def build(spec: BuildSpec) -> None:
    """Make the graph, quantize its MatMuls as the spec says, save it."""
    import onnxruntime_genai.models  # noqa: F401 - puts the builder's modules on sys.path
    import torch
    from builder import set_io_dtype, set_onnx_dtype  # type: ignore[import-not-found]
    from builders.qwen import QwenModel  # type: ignore[import-not-found]

    from loc3r.export.mapped_weights import MappedShards
    from loc3r.export.quantize import quantize_matmuls
    from loc3r.models.llm import qwen2_config

    hf_config = qwen2_config(LLMConfig(**spec.config))
    hf_config.architectures = ["Qwen2ForCausalLM"]
    shards = MappedShards([Path(f) for f in spec.files])

    class BundleQwen(QwenModel):
        """The builder's Qwen2 reading our memory-mapped tensors."""

        def load_weights(self, input_path: str) -> torch.nn.Module:
            return _mapped_qwen2(hf_config, shards, spec.prefix)

    options = dict(BUILDER_OPTIONS)
    io_dtype = set_io_dtype(spec.float_type, spec.provider, options)
    onnx_dtype = set_onnx_dtype(spec.float_type, options)
    out = Path(spec.out_dir)
    cache = out / ".builder_cache"
    out.mkdir(parents=True, exist_ok=True)
    model = BundleQwen(hf_config, io_dtype, onnx_dtype, spec.provider, str(cache), options)
    with torch.no_grad():
        model.make_model(str(out))
    quantize_matmuls(model.model, lambda node: spec.weight_quant(node.outputs[0].name == LOGITS), shards.release)
    _release_after_reading(model.model, shards.release)
    model.save_model(str(out))


def _mapped_qwen2(hf_config: Any, shards: Any, prefix: str) -> Any:
    """A ``Qwen2ForCausalLM`` whose parameters are views of the mapped files; the input
    embedding (left out of the graph) stays on the meta device unless lm_head shares it."""
    import torch
    from torch import nn
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(hf_config).eval()
    for name, _ in list(model.named_parameters()):
        if name == "model.embed_tokens.weight" and not hf_config.tie_word_embeddings:
            continue
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(shards.tensor(prefix + name), requires_grad=False))
    return model


def _release_after_reading(model: Any, release: Callable[[], None]) -> None:
    """Wrap every lazily computed initializer so that the source pages go back once it is read."""
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        lazy = value.const_value
        if isinstance(lazy, ir.LazyTensor):
            value.const_value = ir.LazyTensor(
                lambda lazy=lazy: _read_then_release(lazy, release), lazy.dtype, lazy.shape, name=lazy.name
            )


def _read_then_release(lazy: Any, release: Callable[[], None]) -> Any:
    tensor = lazy.raw()
    release()
    return tensor


def main(argv: list[str] | None = None) -> int:
    (spec_path,) = sys.argv[1:] if argv is None else argv
    build(BuildSpec.load(Path(spec_path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
