"""The VGGT camera encoder: checkpoint layouts, refusals, and its whole-clip behaviour."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from loc3r.errors import InputError, ModelError
from loc3r.models.vggt import VggtCameraEncoder, VggtConfig, load_vggt, random_state_dict, save_official_checkpoint

TINY = VggtConfig.tiny()


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return random_state_dict(TINY, seed=3)


@pytest.fixture(scope="module")
def tiny_model(tiny_sd: dict[str, torch.Tensor]) -> VggtCameraEncoder:
    model = VggtCameraEncoder(TINY)
    model.load_state_dict(tiny_sd)
    return model.eval()


def test_loads_folder_with_published_files_and_keeps_every_tensor(tmp_path: Path, tiny_sd: dict) -> None:
    save_official_checkpoint(tiny_sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"img_size": 224, "patch_size": 14, "embed_dim": 128}')
    model = load_vggt(tmp_path)
    assert model.config == TINY and model.camera_dim == 256
    for key, value in model.state_dict().items():
        assert torch.equal(value, tiny_sd[key]), key


def test_torch_save_with_module_prefix(tmp_path: Path, tiny_sd: dict) -> None:
    path = tmp_path / "model.pt"
    torch.save({"model": {f"module.aggregator.{k}": v for k, v in tiny_sd.items()}}, path)
    assert load_vggt(path).config == TINY


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, sd: p.write_bytes(b"not a checkpoint"), "is not a readable checkpoint"),
        (lambda p, sd: torch.save({"model": sd, "args": argparse.Namespace(model="CUT3R")}, p), "holds Python objects besides tensors"),
        (lambda p, sd: torch.save({"model": {"decoder_embed.weight": torch.zeros(2, 2)}}, p), "is not a VGGT checkpoint"),
        (lambda p, sd: torch.save({f"aggregator.{k}": v for k, v in sd.items() if "global_blocks.1." not in k}, p), "missing global_blocks.1."),
        (lambda p, sd: torch.save({f"aggregator.{k}": v for k, v in sd.items() if k != "patch_embed.norm.weight"}, p), "missing patch_embed.norm.weight"),
    ],
)
def test_refusals_name_the_problem(tmp_path: Path, tiny_sd: dict, make, message: str) -> None:  # noqa: ANN001
    path = tmp_path / "model.pt"
    make(path, tiny_sd)
    with pytest.raises(ModelError, match=message):
        load_vggt(path)


def test_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="holds neither model.safetensors nor model.pt"):
        load_vggt(tmp_path)


def test_bad_clip_shape(tiny_model: VggtCameraEncoder) -> None:
    with pytest.raises(InputError, match="multiples of 14"):
        tiny_model.encode(torch.rand(2, 3, 100, 112))


def test_every_token_depends_on_every_frame(tiny_model: VggtCameraEncoder) -> None:
    """Global attention: changing the last frame changes the first frame's camera token;
    the clip's first frame is the reference (its own camera token), so order matters."""
    clip = torch.rand(4, 3, 56, 84, generator=torch.Generator().manual_seed(0))
    base = tiny_model.encode(clip)
    changed = clip.clone()
    changed[-1] = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(1))
    assert (tiny_model.encode(changed)[0] - base[0]).abs().max() > 1e-3
    shifted = tiny_model.encode(clip[[1, 0, 2, 3]])
    assert (shifted[0] - base[1]).abs().max() > 1e-3  # frame 1 as the reference frame reads differently


def test_batched_forward_equals_per_clip_encode(tiny_model: VggtCameraEncoder) -> None:
    clips = torch.rand(2, 3, 3, 42, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = tiny_model(clips)
    for clip, tokens in zip(clips, batched, strict=True):
        torch.testing.assert_close(tiny_model.encode(clip), tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoder_3d": "dust3r"}, "encoder_3d is 'dust3r', expected one of 'cut3r', 'vggt'"),
        ({"vggt": {"depth": 0}}, "vggt.depth is 0, expected an integer from 1 to 256"),
        ({"vggt": {"rope_freq": float("nan")}}, "vggt.rope_freq is nan, expected a number above 0"),
        ({"vggt": {"embed_dim": 100, "num_heads": 3}}, "head size that is not a multiple of 4"),
        ({"vggt": {"colour": 1}}, "unknown VGGT config fields"),
    ],
)
def test_bundle_config_names_a_bad_3d_encoder_section(change: dict, message: str) -> None:
    from loc3r.models.config import Loc3rConfig
    from loc3r.models.tiny import tiny_vggt_config

    data = {**tiny_vggt_config(300).to_dict(), **change}
    with pytest.raises(ModelError, match=message):
        Loc3rConfig.from_dict(data)
