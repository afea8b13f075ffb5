"""Parity with the reference VGGT aggregator (facebookresearch/vggt 44b3afb) on random weights.

Golden camera tokens were made by tests/fixtures/make_vggt_fixtures.py (see
tests/fixtures/README.md). Each test writes the random weights as a published-layout
checkpoint, loads it with ``load_vggt`` and matches every frame's camera token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loc3r.models.vggt import VggtConfig, load_vggt, random_state_dict, save_official_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "vggt"
RTOL = 1e-4


def reference_case(name: str) -> tuple[VggtConfig, dict[str, str], torch.Tensor, torch.Tensor]:
    """Config, metadata, the clip (T, 3, H, W) in [0, 1] and the reference camera tokens."""
    with safe_open(FIXTURES / f"{name}.safetensors", "pt") as f:
        meta = f.metadata()
        camera = f.get_tensor("camera")
    assert meta["reference_commit"] == "44b3afb"
    count, height, width = (int(meta[k]) for k in ("frames", "height", "width"))
    generator = torch.Generator().manual_seed(int(meta["frames_seed"]))
    clip = torch.rand((count, 3, height, width), generator=generator)
    return VggtConfig.from_dict(json.loads(meta["config"])), meta, clip, camera


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Every element within ``rtol`` of the reference's scale (its largest magnitude)."""
    assert actual.shape == expected.shape
    worst = (actual - expected).abs().max().item() / expected.abs().max().item()
    assert worst <= rtol, worst


def _check_case(name: str, checkpoint: Path) -> None:
    config, meta, clip, expected = reference_case(name)
    save_official_checkpoint(random_state_dict(config, int(meta["weight_seed"])), checkpoint)
    model = load_vggt(checkpoint)
    assert model.config == config
    assert model.skipped_keys == ("patch_embed.mask_token",)
    assert_relative(model.encode(clip), expected, RTOL)


def test_parity_tiny_six_frames_resized_position_embedding(tmp_path: Path) -> None:
    _check_case("tiny", tmp_path / "model.pt")  # 9x16 grid: the 16x16 table is resized


def test_parity_tiny_training_grid(tmp_path: Path) -> None:
    (tmp_path / "VGGT-tiny").mkdir()
    _check_case("tiny_square", tmp_path / "VGGT-tiny" / "model.safetensors")


@pytest.mark.slow  # VGGT-1B widths (1024, 16 heads, 518 geometry) at two blocks per stack: ~30 s
def test_parity_real_width(tmp_path: Path) -> None:
    _check_case("real_width", tmp_path / "model.safetensors")


def test_onnx_runtime_parity_tiny_six_frames(tmp_path: Path) -> None:
    """The exported ``vggt_encode`` graph (raw camera tokens, frames dynamic) against the reference."""
    from loc3r.export.graphs import CameraClipGraph, camera_clip_spec
    from loc3r.export.onnx_export import export_onnx
    from loc3r.runtime.ort import open_session

    config, meta, clip, expected = reference_case("tiny")
    save_official_checkpoint(random_state_dict(config, int(meta["weight_seed"])), tmp_path / "model.pt")
    height, width = clip.shape[-2:]
    graph = CameraClipGraph(load_vggt(tmp_path / "model.pt"), None, height, width)
    spec = camera_clip_spec(height, width, config.camera_dim)
    path = export_onnx(graph, spec, (clip[:2],), tmp_path / "vggt_encode.onnx")  # traced on 2 frames, run on 6
    (camera,) = open_session(path).run(["camera"], {"images": clip.numpy()})
    assert_relative(torch.from_numpy(camera), expected, 1e-3)
