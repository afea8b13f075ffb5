"""Random checkpoints in the published layouts, written tensor by tensor (never whole in memory).

- :func:`write_llava_next`: a LLaVA-Video folder as ``lmms-lab/LLaVA-Video-7B-Qwen2`` ships it:
  ``config.json`` (LLaVA-NeXT's Qwen2 config with ``mm_*`` fields), Qwen2's slow tokenizer
  files (``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` + ``added_tokens.json`` +
  ``special_tokens_map.json``, no ``tokenizer.json``) and safetensors shards with an index.
- :func:`write_cut3r_pth`: CUT3R's ``torch.save({"args", "model"})`` for a config.

Weights are random (linear weights N(0, 0.02), norm weights 1, biases 0): these files are
for sizes, layouts, memory and time, never for answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import pre_tokenizers

from loc3r.models.convert_stream import TensorInfo, write_shards
from loc3r.models.cut3r import Cut3rConfig, official_model_line, random_state_dict, save_official_checkpoint
from loc3r.models.tokenizer import END_OF_TEXT, IM_END, IM_START

QWEN2_CHAT_TOKENS = (END_OF_TEXT, IM_START, IM_END)
QWEN2_BPE_TOKENS = 151_643  # Qwen2's byte-level BPE vocabulary; its chat tokens follow at 151643..151645
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."


@dataclass(frozen=True)
class TowerSizes:
    """A SigLIP tower as LLaVA-NeXT saves it (the last layer already dropped, no head)."""

    hidden: int = 1152
    intermediate: int = 4304
    stored_layers: int = 26
    patch: int = 14
    image_size: int = 384

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2


# lmms-lab/LLaVA-Video-7B-Qwen2's config.json: the fields as published (Qwen2-7B + SigLIP
# so400m/14 at 384 + mlp2x_gelu + LLaVA-Video's video settings).
LLAVA_VIDEO_7B_QWEN2: dict[str, Any] = {
    "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064, "add_faster_video": False, "add_time_instruction": True, "faster_token_stride": 10,
    "force_sample": True, "image_aspect_ratio": "anyres_max_9", "image_crop_resolution": None,
    "image_grid_pinpoints": [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)],
    "image_split_resolution": None, "mm_hidden_size": 1152, "mm_newline_position": "grid",
    "mm_patch_merge_type": "spatial_unpad", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None, "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": 2,
    "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model", "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_vision_tower_lr": 2e-06,
    "tokenizer_model_max_length": 32768, "tokenizer_padding_side": "right", "use_mm_proj": True,
    "vision_tower_pretrained": None,
}


def llava_next_shapes(config: dict[str, Any], tower: TowerSizes) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LLaVA-NeXT checkpoint with ``config``'s LLM, in the published order."""
    h, i, t = tower.hidden, tower.intermediate, TOWER_PREFIX
    d, f = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * d // config["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], d)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
                   p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
                   p + "self_attn.o_proj.weight": (d, d), p + "mlp.gate_proj.weight": (f, d),
                   p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    shapes["model.norm.weight"] = (d,)
    shapes |= {t + "embeddings.patch_embedding.weight": (h, 3, tower.patch, tower.patch),
               t + "embeddings.patch_embedding.bias": (h,), t + "embeddings.position_embedding.weight": (tower.patches, h)}
    for n in range(tower.stored_layers):
        p = f"{t}encoder.layers.{n}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            shapes |= {p + name + ".weight": (h, h), p + name + ".bias": (h,)}
        shapes |= {p + "mlp.fc1.weight": (i, h), p + "mlp.fc1.bias": (i,), p + "mlp.fc2.weight": (h, i), p + "mlp.fc2.bias": (h,)}
        shapes |= {p + f"layer_norm{k}.{w}": (h,) for k in (1, 2) for w in ("weight", "bias")}
    shapes |= {t + "post_layernorm.weight": (h,), t + "post_layernorm.bias": (h,)}
    shapes |= {"model.mm_projector.0.weight": (d, h), "model.mm_projector.0.bias": (d,),
               "model.mm_projector.2.weight": (d, d), "model.mm_projector.2.bias": (d,), "model.image_newline": (d,)}
    shapes["lm_head.weight"] = (config["vocab_size"], d)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, 0.02)."""
    if "norm" in name and name.endswith(".weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, generator=generator, dtype=dtype).mul_(0.02)  # no float32 copy of a 1 GB table


def write_llava_next(
    folder: Path,
    config: dict[str, Any],
    tower: TowerSizes = TowerSizes(),
    tokenizer_size: int = QWEN2_BPE_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5_000_000_000,
    seed: int = 0,
) -> list[Path]:
    """Write a LLaVA-NeXT checkpoint folder; returns its weight shards (written one tensor at a time)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    vocab, merges = synthetic_byte_level_bpe(tokenizer_size)
    write_qwen2_tokenizer_files(folder, vocab, merges, [(token, tokenizer_size + k) for k, token in enumerate(QWEN2_CHAT_TOKENS)])
    shapes = llava_next_shapes(config, tower)
    infos = {name: TensorInfo(dtype, shape) for name, shape in shapes.items()}
    generator = torch.Generator().manual_seed(seed)
    tensors: Iterator[tuple[str, torch.Tensor]] = ((n, random_tensor(n, s, generator, dtype)) for n, s in shapes.items())
    return [folder / name for name in write_shards(folder, infos, tensors, max_shard_bytes)]


def write_cut3r_pth(path: Path, config: Cut3rConfig, seed: int = 0) -> Path:
    """CUT3R's published ``.pth`` layout for ``config`` (camera path at full size, random)."""
    save_official_checkpoint(random_state_dict(config, seed=seed), official_model_line(config), path)
    return path


def synthetic_byte_level_bpe(size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A valid byte-level BPE of ``size`` tokens: the 256 byte symbols, then merges of every
    pair of symbols, then of pairs with a third symbol (printable ASCII first), in rank order."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: (not c.isascii() or not c.isprintable(), c))
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    level = list(alphabet)
    while len(vocab) < size:
        grown = []
        for left in level:
            for right in alphabet:
                token = left + right
                if token in vocab:
                    continue
                vocab[token] = len(vocab)
                merges.append((left, right))
                grown.append(token)
                if len(vocab) == size:
                    return vocab, merges
        level = grown
    return vocab, merges


def write_qwen2_tokenizer_files(
    folder: Path, vocab: dict[str, int], merges: Sequence[tuple[str, str]], added: Sequence[tuple[str, int]]
) -> None:
    """Qwen2's slow tokenizer files, as LLaVA-NeXT checkpoints carry them; ``added`` are the
    chat tokens (content, id), all special."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    decoder = {str(token_id): {"content": content, **flags, "special": True} for content, token_id in added}
    settings = {"add_prefix_space": False, "added_tokens_decoder": decoder, "additional_special_tokens": [IM_START, IM_END],
                "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": IM_END, "errors": "replace",
                "model_max_length": 32768, "pad_token": END_OF_TEXT, "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (folder / "added_tokens.json").write_text(json.dumps(dict(added)), encoding="utf-8")
    special = {"additional_special_tokens": [IM_START, IM_END], "eos_token": {"content": IM_END, **flags},
               "pad_token": {"content": END_OF_TEXT, **flags}}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def parameter_count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())
