"""FLOP counts checked against hand arithmetic at small sizes; the roofline rules."""

from __future__ import annotations

import dataclasses

import pytest

from loc3r.bench.floor import ModelSizes, Workload, floor_report, render_markdown, stage_floor
from loc3r.bench.flops import (
    Cut3rSizes,
    bits_per_weight,
    cross_block,
    cut3r_frame,
    kv_bytes_per_token,
    llm_forward,
    qwen2_layer,
    siglip_frame,
    vit_block,
    vocab_params,
)
from loc3r.engines.targets import list_targets, load_target
from loc3r.models.config import LLMConfig, VisionConfig

SIGLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")


def test_vit_block_by_hand() -> None:
    n, d, m = 4, 8, 32  # tokens, width, MLP width
    qkv = 2 * n * d * (3 * d)  # 1536
    scores = 2 * n * n * d  # QK^T over all heads: 256
    mix = 2 * n * n * d  # P V: 256
    proj = 2 * n * d * d  # 512
    mlp = 2 * n * d * m + 2 * n * m * d  # fc1 + fc2: 4096
    assert qkv + scores + mix + proj + mlp == 6656
    work = vit_block(n, d, m)
    assert work.flops == 6656
    assert work.params == 4 * d * d + 2 * d * m  # Wqkv + Wo + fc1 + fc2


def test_cut3r_decoder_block_by_hand() -> None:
    n_x, n_y, d, m = 3, 5, 4, 16  # own tokens, other stream's tokens, width, MLP width
    self_attn = 2 * n_x * d * 3 * d + 2 * (2 * n_x * n_x * d) + 2 * n_x * d * d  # 288 + 144 + 96
    cross_q = 2 * n_x * d * d  # 96
    cross_kv = 2 * n_y * d * 2 * d  # keys/values from the other stream: 320
    cross_core = 2 * (2 * n_x * n_y * d)  # QK^T + PV: 240
    cross_out = 2 * n_x * d * d  # 96
    mlp = 2 * (2 * n_x * d * m)  # 768
    total = self_attn + cross_q + cross_kv + cross_core + cross_out + mlp
    assert total == 2048
    assert cross_block(n_x, n_y, d, m).flops == total
    assert cross_block(n_x, n_y, d, m).params == 8 * d * d + 2 * d * m


def test_qwen2_layer_by_hand() -> None:
    cfg = LLMConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                    num_hidden_layers=1, vocab_size=10)  # head_dim 4, KV width 4
    n, past = 3, 2
    q = 2 * n * 8 * 8  # 384
    k = v = 2 * n * 8 * 4  # GQA: one KV head of 4 -> 192 each
    o = 2 * n * 8 * 8  # 384
    keys_seen = (past + 1) + (past + 2) + (past + 3)  # causal: 3 + 4 + 5 = 12 query-key pairs
    attn = 2 * keys_seen * 8 + 2 * keys_seen * 8  # QK^T and PV over 2 heads x 4 dims: 384
    mlp = 3 * (2 * n * 8 * 16)  # gate, up, down: 2304
    total = q + k + v + o + attn + mlp
    assert total == 3840
    work = qwen2_layer(cfg, n, past)
    assert work.flops == total
    assert work.params == 8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16


def test_int4_bytes_at_block_sizes() -> None:
    weights = 4096
    # 4 bits per weight + one fp16 scale per block
    assert weights * bits_per_weight("int4", 32) / 8 == 4096 * 4 / 8 + (4096 / 32) * 2  # 2304
    assert bits_per_weight("int4", 32) == 4.5
    assert bits_per_weight("int4", 128) == 4.125
    assert bits_per_weight("fp16") == 16
    with pytest.raises(ValueError):
        bits_per_weight("int4")


def test_kv_bytes_qwen2_7b() -> None:
    # K and V x 28 layers x 4 KV heads x 128 dims x 2 bytes = 57344 bytes per position
    assert kv_bytes_per_token(LLMConfig()) == 2 * 28 * 4 * 128 * 2


def test_floor_is_max_of_compute_and_memory() -> None:
    hw = load_target("x86-cuda").hardware
    compute_heavy = stage_floor(hw.peak_tflops * 1e12, 1.0, hw)
    assert compute_heavy.seconds == pytest.approx(1.0) and compute_heavy.bound == "compute"
    memory_heavy = stage_floor(1.0, hw.bandwidth_gbs * 1e9 * 2, hw)
    assert memory_heavy.seconds == pytest.approx(2.0) and memory_heavy.bound == "memory"
    assert stage_floor(hw.peak_tflops * 1e12, 1.0, hw, efficiency=0.5).seconds == pytest.approx(2.0)
    with pytest.raises(ValueError):
        stage_floor(1.0, 1.0, hw, efficiency=0.0)


@pytest.mark.slow  # ~4 s of imports (transformers); run with -m slow
def test_param_counts_match_the_real_modules() -> None:
    """Weights (ndim >= 2) of the real-size modules, built on the meta device (no memory)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from loc3r.models.cut3r.encoder import Cut3rCameraEncoder

    def weights(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and not any(s in n for s in skip))

    vision, llm, cut3r = VisionConfig(), LLMConfig(), Cut3rSizes()
    with torch.device("meta"):
        siglip = SiglipVisionModel(SiglipVisionConfig(**{k: getattr(vision, k) for k in SIGLIP_FIELDS}))
        qwen = Qwen2ForCausalLM(Qwen2Config(**dataclasses.asdict(llm)))
        camera = Cut3rCameraEncoder(cut3r.config)
    # SigLIP: all 27 layers and the patch conv; the position table and pooling head are not matmuls
    assert weights(siglip, skip=("position", "head")) == siglip_frame(vision, 27).params
    assert weights(qwen) == llm_forward(llm, 1).params + 2 * vocab_params(llm)  # + embedding, lm_head
    # CUT3R: only pose_token and masked_token (768 each) are not counted
    assert weights(camera) - cut3r_frame(cut3r).params == 2 * cut3r.config.dec_embed_dim


def test_cut3r_heads_share() -> None:
    sizes = Cut3rSizes()
    body, full = cut3r_frame(sizes), cut3r_frame(sizes, with_heads=True)
    assert (full.flops - body.flops) / full.flops == pytest.approx(sizes.head_flop_share)
    assert sizes.patches == 768  # 32 x 24 at 512x384


def test_real_sizes_are_plausible() -> None:
    report = floor_report("x86-cuda")
    # Qwen2-7B layers + lm_head at fp16: 7.07e9 params (the 7.62e9 total less the embedding)
    assert report["memory"]["llm_gib"] * 2**30 / 2 == pytest.approx(7.07e9, rel=0.01)
    assert report["workload"]["prefix_tokens"] == 20 + 32 * 211 + 230
    assert report["stages"]["decode_token"]["bound"] == "memory"
    assert report["ttft_cached_s"] < report["ttft_cold_s"]
    # the 27th SigLIP layer is never run
    fewer = floor_report("x86-cuda", sizes=ModelSizes(vision_layers_used=27))
    assert fewer["stages"]["vision"]["flops"] > report["stages"]["vision"]["flops"]


def test_markdown_has_every_target_and_the_paper_rows() -> None:
    work = dataclasses.replace(Workload(), frames=8)
    reports = [floor_report(name, work=work) for name in list_targets()]
    text = render_markdown(reports)
    for name in list_targets():
        assert name in text
    assert "paper / floor" in text and "not measured here" in text and "| 1.2 |" in text
