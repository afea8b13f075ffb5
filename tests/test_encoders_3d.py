"""The CUT3R-vs-VGGT benchmark's FLOP model and its recorded results."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from loc3r.bench.encoders_3d import markdown
from loc3r.bench.provenance import without_stale_note
from loc3r.bench.flops import attention_flops, vggt_clip, vggt_global_attention_flops
from loc3r.models.vggt import VggtCameraEncoder, VggtConfig

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"


def test_vggt_flop_model_matches_torch_counter() -> None:
    """Every matrix product but attention's (which the counter does not see on CPU) is counted
    exactly; the attention products are the model's own formula."""
    config, frames, height, width = VggtConfig.tiny(), 3, 56, 84
    encoder = VggtCameraEncoder(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.encode(torch.rand(frames, 3, height, width))
    per_frame = (height // 14) * (width // 14) + 1 + config.num_register_tokens
    local_attention = attention_flops(per_frame, per_frame, config.embed_dim) * frames * (config.depth + config.patch_embed_depth)
    attention = local_attention + vggt_global_attention_flops(config, frames, height, width)
    assert counter.get_total_flops() == vggt_clip(config, frames, height, width).flops - attention


def test_global_attention_grows_with_the_square_of_the_frames() -> None:
    config = VggtConfig()
    assert vggt_global_attention_flops(config, 64, 392, 518) == 4 * vggt_global_attention_flops(config, 32, 392, 518)


def test_recorded_markdown_is_rendered_from_the_recorded_json() -> None:
    doc = json.loads((RESULTS / "encoders_3d.json").read_text(encoding="utf-8"))
    # the stale note under the title is added afterwards (python -m loc3r.bench.provenance --mark-stale)
    assert without_stale_note((RESULTS / "encoders_3d.md").read_text(encoding="utf-8")) == markdown(doc)
    assert doc["small"]["frames"] == 32 and doc["machine"]["torch_threads"] == 1
