"""Tiny LLaVA-Video checkpoints written in the published layouts (LLaVA-NeXT and
transformers' llava-onevision -hf), a tiny official CUT3R ``.pth``, and loc3r-convert's CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from loc3r.bench.fabricate import QWEN2_CHAT_TOKENS, write_qwen2_tokenizer_files
from loc3r.models.convert_cli import main
from loc3r.models.cut3r import Cut3rConfig, official_model_line, random_state_dict, save_official_checkpoint
from loc3r.models.tokenizer import qwen2_tokenizer

VOCAB = 320  # the tokenizer uses ~300 ids; <Pos>/<Ori> go to the spare rows
LLM_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
TOWER_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   image_size=56, patch_size=14, vision_use_head=False)  # 4x4 patches, 2 used layers
T5_TO_T4 = (("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.image_newline", "image_newline"), ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."))
T5_TO_NEXT = (("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
              ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
              ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
              ("model.language_model.", "model."))
NEXT_TO_T5 = tuple((b, a) for a, b in T5_TO_NEXT[:3]) + (("model.image_newline", "model.image_newline"), ("model.", "model.language_model."))
T5_TO_BUNDLE = (("model.vision_tower.", "vision.tower."), ("model.multi_modal_projector.linear_1.", "vision.projector.0."),
                ("model.multi_modal_projector.linear_2.", "vision.projector.2."), ("model.image_newline", "vision.image_newline"),
                ("model.language_model.", "llm.model."), ("lm_head.", "llm.lm_head."))


def rename(name: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old):]
    return None


# --- fabricated checkpoints ---------------------------------------------------------------


TOKENIZER_SHAPES = ("tokenizer.json", "vocab+merges")


def tokenizer_without_loc3r_tokens(
    corpus: list[str] | None = None, vocab_size: int = 297
) -> Tokenizer:
    """A byte-level BPE shaped as Qwen2's: trained vocabulary first, then its chat tokens as
    added special tokens at the next ids; no <Pos>/<Ori> (as Qwen2's own)."""
    tokenizer = qwen2_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus or ["where am I standing in this room?", "the chair is left of the table"] * 20, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_CHAT_TOKENS])
    return tokenizer


def write_tokenizer(folder: Path, tokenizer: Tokenizer, shape: str = "tokenizer.json") -> None:
    """``tokenizer.json``, or the files LLaVA-NeXT checkpoints carry instead (Qwen2's slow
    tokenizer files: vocab.json, merges.txt, tokenizer_config.json with added_tokens_decoder,
    added_tokens.json, special_tokens_map.json)."""
    if shape == "tokenizer.json":
        tokenizer.save(str(folder / "tokenizer.json"))
        return
    data = json.loads(tokenizer.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    added = [(t["content"], t["id"]) for t in data["added_tokens"]]
    write_qwen2_tokenizer_files(folder, data["model"]["vocab"], merges, added)


def hf_model(vocab: int = VOCAB, image_size: int = 56) -> LlavaOnevisionForConditionalGeneration:
    """A random tiny llava-onevision as the -hf checkpoints are (used layers only)."""
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**{**TOWER_SIZES, "image_size": image_size}), text_config=Qwen2Config(**{**LLM_SIZES, "vocab_size": vocab}),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_index=vocab - 2,
        video_token_index=vocab - 1,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced tensor shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def write_weights(folder: Path, state: dict[str, torch.Tensor], fmt: str, shards: int = 3) -> None:
    """``state`` as ``shards`` safetensors or .bin files with a Hugging Face index."""
    names = list(state)
    per = -(-len(names) // shards)
    stem, ext, index = (("model", "safetensors", "model.safetensors.index.json") if fmt == "safetensors"
                        else ("pytorch_model", "bin", "pytorch_model.bin.index.json"))
    weight_map = {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: state[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, str(folder / file)) if fmt == "safetensors" else torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def hf_folder(root: Path, names: str, fmt: str, tokenizer: str = "tokenizer.json") -> tuple[Path, LlavaOnevisionForConditionalGeneration]:
    """An -hf checkpoint with transformers-5 (``t5``) or -4 (``t4``) tensor names."""
    model = hf_model()
    folder = root / f"hf-{names}-{fmt}"
    folder.mkdir()
    (folder / "config.json").write_text(model.config.to_json_string())
    state = {(rename(n, T5_TO_T4) if names == "t4" else n) or n: t for n, t in model.state_dict().items()}
    write_weights(folder, state, fmt)
    write_tokenizer(folder, tokenizer_without_loc3r_tokens(), tokenizer)
    return folder, model


def next_folder(
    root: Path, fmt: str = "safetensors", vocab: int = VOCAB, image_size: int = 56, tower: str | None = None,
    tokenizer: str = "vocab+merges",
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LLaVA-NeXT checkpoint (Qwen2 config + mm_* fields, ``model_type: llava``); returns
    its state dict. Its tower name states the input size, as ``siglip-so400m-patch14-384``
    does; its tokenizer is in Qwen2's slow files by default, as the published one."""
    model = hf_model(vocab, image_size)
    folder = root / f"next-{fmt}"
    folder.mkdir()
    state = {rename(n, T5_TO_NEXT) or n: t for n, t in model.state_dict().items()}
    tower = tower or f"tiny-siglip-patch14-{image_size}"
    config = {**LLM_SIZES, "vocab_size": vocab, "model_type": "llava",
              "architectures": ["LlavaQwenForCausalLM"], "mm_vision_tower": tower,
              "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 64, "mm_vision_select_layer": -2,
              "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": 2, "mm_newline_position": "grid",
              "image_aspect_ratio": "anyres_max_9", "rope_theta": 10000.0, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    write_weights(folder, state, fmt)
    write_tokenizer(folder, tokenizer_without_loc3r_tokens(), tokenizer)
    return folder, state


def write_cut3r_file(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny CUT3R checkpoint in the official layout, and its state dict."""
    config = Cut3rConfig.tiny()
    state = random_state_dict(config, seed=3)
    path = folder / "cut3r_tiny.pth"
    save_official_checkpoint(state, official_model_line(config), path)
    return path, state


def convert(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loc3r-convert: error: "), err
    assert all(word in lines[0] for word in words), err
