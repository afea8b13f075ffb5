"""The LLaVA-Video vision path: token geometry, newline layout, and parity with transformers'
llava-onevision (same tower, projector and bilinear pooling; one newline per video there)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from loc3r.errors import ModelError
from loc3r.models.config import LLMConfig, Loc3rConfig, VisionConfig
from loc3r.models.convert_llava import _LLM_RULES
from loc3r.models.llm import TorchLLM, build_qwen2
from loc3r.models.vision import (
    VisionPath,
    layout_tokens,
    pooled_token_offsets,
    spatial_pool,
    used_vision_layers,
    vision_state_dict_from_hf_llava_onevision,
    vision_state_dict_from_llava_next,
    vision_tokens_per_frame,
)

TOL = 1e-5
VOCAB = 96
TINY_LLM = LLMConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_config(image_size: int = 56, layers: int = 3, **kwargs) -> Loc3rConfig:
    """Tiny widths; ``image_size`` 56 -> 4x4 patch grid, 70 -> 5x5."""
    vision = VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
    )
    return Loc3rConfig(model_id="test", vision=vision, llm=TINY_LLM, **kwargs)


def hf_onevision(config: Loc3rConfig, extra_layer: bool) -> LlavaOnevisionForConditionalGeneration:
    """A random llava-onevision selecting the same layer as ``config``.

    Without ``extra_layer`` its tower holds only the used layers (``vision_feature_layer=-1``,
    as the published -hf checkpoints); with it, the full tower and ``-2``.
    """
    v, llm = config.vision, config.llm
    used = used_vision_layers(v, config.vision_select_layer)
    vision_config = SiglipVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=used + 1 if extra_layer else used,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
        vision_use_head=False,
    )
    text_config = Qwen2Config(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        max_position_embeddings=llm.max_position_embeddings,
        rope_theta=llm.rope_theta,
        rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=llm.tie_word_embeddings,
    )
    hf_config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_feature_layer=-2 if extra_layer else -1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_token_index=VOCAB - 2,
        video_token_index=VOCAB - 1,
    )
    model = LlavaOnevisionForConditionalGeneration(hf_config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced tensor shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def matched_pair(
    config: Loc3rConfig, extra_layer: bool = False
) -> tuple[VisionPath, LlavaOnevisionForConditionalGeneration]:
    """Our VisionPath carrying the weights of a random transformers llava-onevision."""
    torch.manual_seed(0)
    hf = hf_onevision(config, extra_layer)
    ours = VisionPath(config).eval()
    keep = used_vision_layers(config.vision, config.vision_select_layer)
    ours.load_state_dict(vision_state_dict_from_hf_llava_onevision(hf.state_dict(), keep))
    return ours, hf


def video(config: Loc3rConfig, frames: int = 3) -> torch.Tensor:
    """``(1, frames, 3, S, S)`` pixels in [-1, 1]."""
    size = config.vision.image_size
    return torch.rand(1, frames, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


# --- geometry -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "newline", "tokens"),
    [("bilinear", "grid", 210), ("average", "grid", 182), ("bilinear", "no_token", 196),
     ("average", "no_token", 169), ("bilinear", "one_token", 196), ("bilinear", "frame", 197)],
)
def test_tokens_per_frame_so400m(mode: str, newline: str, tokens: int) -> None:
    config = Loc3rConfig(model_id="so400m", spatial_pool_mode=mode, newline_position=newline)
    assert config.vision.grid == 27
    assert vision_tokens_per_frame(config) == tokens
    assert used_vision_layers(config.vision, config.vision_select_layer) == 26


@pytest.mark.parametrize(("mode", "side"), [("bilinear", 14), ("average", 13), ("max", 13)])
@pytest.mark.parametrize("newline_position", ["grid", "frame", "one_token", "no_token"])
def test_pool_and_newlines_at_27x27(mode: str, side: int, newline_position: str) -> None:
    features = torch.randn(2, 27 * 27, 8)
    newline = torch.full((8,), 1e4)
    pooled = spatial_pool(features, mode, 2)
    assert pooled.shape == (2, side, side, 8)
    tokens = layout_tokens(pooled, newline, newline_position)
    flat = pooled.reshape(2, -1, 8)
    if newline_position in ("one_token", "no_token"):  # one_token's newline follows the video
        assert torch.equal(tokens, flat)
    elif newline_position == "frame":
        assert tokens.shape == (2, side * side + 1, 8)
        assert torch.equal(tokens[:, :-1], flat) and torch.equal(tokens[:, -1], newline.expand(2, 8))
    else:
        assert tokens.shape == (2, side * (side + 1), 8)
        rows = tokens.view(2, side, side + 1, 8)
        assert torch.equal(rows[:, :, side], newline.expand(2, side, 8))  # one after every row
        assert torch.equal(rows[:, :, :side], pooled)
    offsets = pooled_token_offsets(side, newline_position)
    assert torch.equal(tokens[:, offsets], flat)


def test_pooling_formulas_at_27x27() -> None:
    features = torch.randn(1, 27 * 27, 4)
    maps = features.view(1, 27, 27, 4).permute(0, 3, 1, 2)
    expected = {
        "bilinear": F.interpolate(maps, size=(14, 14), mode="bilinear", align_corners=False),
        "average": F.avg_pool2d(maps, 2),
        "max": F.max_pool2d(maps, 2),
    }
    for mode, reference in expected.items():
        assert torch.equal(spatial_pool(features, mode, 2), reference.permute(0, 2, 3, 1))


@pytest.mark.parametrize(
    ("image_size", "mode", "newline", "tokens"),
    [
        (56, "bilinear", "grid", 2 * 3),  # 4x4 -> 2x2
        (56, "average", "grid", 2 * 3),
        (70, "bilinear", "grid", 3 * 4),  # 5x5 -> ceil 3x3
        (70, "average", "grid", 2 * 3),  # 5x5 -> floor 2x2
        (70, "bilinear", "no_token", 9),
        (70, "average", "no_token", 4),
    ],
)
def test_tiny_tower_token_counts(image_size: int, mode: str, newline: str, tokens: int) -> None:
    config = tiny_config(image_size, spatial_pool_mode=mode, newline_position=newline)
    torch.manual_seed(0)
    path = VisionPath(config).eval()
    frames = video(config)[0]
    with torch.no_grad():
        out = path.encode(frames)
    grid = config.vision.grid
    assert path.tokens_per_frame == vision_tokens_per_frame(config) == tokens
    assert path.features(frames).shape == (3, grid * grid, TINY_LLM.hidden_size)
    assert out.shape == (3, tokens, TINY_LLM.hidden_size)
    if newline == "grid":
        side = path.pool(path.features(frames)).shape[1]
        newlines = out.view(3, side, side + 1, -1)[:, :, side]
        assert torch.equal(newlines, path.image_newline.detach().expand_as(newlines))


@pytest.mark.parametrize(("select", "used"), [(-2, 2), (-1, 3), (1, 1), (3, 3)])
def test_select_layer_keeps_only_used_layers(select: int, used: int) -> None:
    config = tiny_config(layers=3, vision_select_layer=select)
    path = VisionPath(config)
    assert len(path.tower.encoder.layers) == used
    names = path.state_dict().keys()
    assert not any("post_layernorm" in name or ".head." in name for name in names)
    assert {name.split(".")[0] for name in names} == {"tower", "projector", "image_newline"}
    assert {"projector.0.weight", "projector.2.bias"} <= set(names)


@pytest.mark.parametrize("select", [0, 4, -5])
def test_select_layer_out_of_range(select: int) -> None:
    with pytest.raises(ModelError):
        used_vision_layers(VisionConfig(num_hidden_layers=3), select)


# --- parity with transformers' llava-onevision --------------------------------------------


@pytest.mark.parametrize("image_size", [56, 70])
@pytest.mark.parametrize("extra_layer", [False, True])
def test_bilinear_features_match_transformers(image_size: int, extra_layer: bool) -> None:
    config = tiny_config(image_size)
    ours, hf = matched_pair(config, extra_layer)
    pixels = video(config)
    with torch.no_grad():
        reference = hf.model.get_video_features(pixel_values_videos=pixels).pooler_output[0]
        pooled = ours.pool(ours.features(pixels[0]))
    assert torch.equal(reference[-1], hf.model.image_newline)  # one newline, end of video
    diff = (pooled.reshape(-1, pooled.shape[-1]) - reference[:-1]).abs().max().item()
    assert diff < TOL, diff
    assert reference.abs().max() > 1e-2  # not a trivially zero comparison


def test_average_matches_avg_pool_of_transformers_features() -> None:
    config = tiny_config(70, spatial_pool_mode="average")
    ours, hf = matched_pair(config)
    frames = video(config)[0]
    with torch.no_grad():
        hidden = hf.model.vision_tower(frames, output_hidden_states=True).hidden_states[-1]
        projected = hf.model.multi_modal_projector(hidden)
        pooled = ours.pool(ours.features(frames))
    assert (ours.features(frames) - projected).abs().max().item() < TOL
    maps = projected.view(3, 5, 5, -1).permute(0, 3, 1, 2)
    reference = F.avg_pool2d(maps, 2).permute(0, 2, 3, 1)
    assert pooled.shape == (3, 2, 2, TINY_LLM.hidden_size)
    assert (pooled - reference).abs().max().item() < TOL


def test_llm_logits_match_transformers_on_our_features() -> None:
    """transformers' llava-onevision end to end (pixels -> logits) against loc3r's own path:
    our VisionPath, then our LLM (``build_qwen2`` from our config, the weights renamed by the
    converter's llava-onevision rules, ``TorchLLM`` prefilling in small chunks over its
    reserved KV cache: the video prefix, then the question, then the question again after
    cutting the cache back to the prefix, as a follow-up does).

    Mutation checked: ``ReservedLayer._reserve`` dropping the copy of the cached keys and
    values when its buffer grows (or ``TorchLLM.prefill`` not passing its cache): the logits
    then differ and this fails.
    """
    config = tiny_config(70)
    ours, hf = matched_pair(config)
    pixels = video(config)
    per_video = pixels.shape[1] * 9 + 1  # 3 frames x 3x3 pooled + one newline
    ids = torch.tensor([[5, 17, 3] + [hf.config.video_token_id] * per_video + [42, 8, 11, 29]])
    is_video = ids[0] == hf.config.video_token_id
    llm = TorchLLM(build_qwen2(config.llm), chunk_tokens=5)
    renamed = {}
    for name, tensor in hf.state_dict().items():
        for prefix, target in _LLM_RULES["hf_onevision"]:
            if name.startswith(prefix):
                renamed[target.removeprefix("llm.") + name[len(prefix):]] = tensor
                break
    llm.model.load_state_dict(renamed)
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values_videos=pixels).logits[0]
        pooled = ours.pool(ours.features(pixels[0]))
        embeds = llm.embed(ids[0].tolist())
        embeds[is_video] = torch.cat((pooled.reshape(-1, pooled.shape[-1]), ours.image_newline[None]))
        prefix = int(is_video.nonzero().max()) + 1
        video_part = llm.prefill(embeds[:prefix])
        question = llm.prefill(embeds[prefix:])
        llm.truncate(prefix)
        follow_up = llm.prefill(embeds[prefix:])
        logits = llm.model.lm_head(torch.cat((video_part.hidden_states, question.hidden_states)))
    assert (logits - reference).abs().max().item() < TOL
    assert (question.last_logits - reference[-1]).abs().max().item() < TOL
    assert torch.equal(follow_up.last_logits, question.last_logits)
    assert reference.abs().max() > 1e-2  # not a trivially zero comparison


def test_key_mapping_accepts_hub_names() -> None:
    config = tiny_config()
    _, hf = matched_pair(config)
    current = hf.state_dict()
    legacy = {}
    for key, tensor in current.items():
        key = key.replace("model.vision_tower.", "vision_tower.vision_model.")
        key = key.replace("model.language_model.", "language_model.model.")
        legacy[key.removeprefix("model.")] = tensor
    mapped = vision_state_dict_from_hf_llava_onevision(legacy)
    assert mapped.keys() == vision_state_dict_from_hf_llava_onevision(current).keys()
    assert mapped.keys() == VisionPath(config).state_dict().keys()


def test_key_mapping_llava_next_layout() -> None:
    """LLaVA-NeXT names, with the full tower (dropped layer, post_layernorm) and LLM saved."""
    config = tiny_config(layers=3)  # 2 used layers
    ours = VisionPath(config).state_dict()
    extra = {
        "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(1),
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.zeros(1),
        "model.embed_tokens.weight": torch.zeros(1),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(1),
        "lm_head.weight": torch.zeros(1),
    }
    renames = (
        ("tower.", "model.vision_tower.vision_tower.vision_model."),
        ("projector.", "model.mm_projector."),
        ("image_newline", "model.image_newline"),
    )
    next_layout = dict(extra)
    for name, tensor in ours.items():
        for our_prefix, next_prefix in renames:
            if name.startswith(our_prefix):
                next_layout[next_prefix + name.removeprefix(our_prefix)] = tensor
    mapped = vision_state_dict_from_llava_next(next_layout, keep_layers=2)
    assert mapped.keys() == ours.keys()
    assert all(mapped[name] is ours[name] for name in ours)
