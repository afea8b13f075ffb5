"""Reading official CUT3R checkpoints: layouts of ``args``, skipped keys and refusals."""

from __future__ import annotations

import argparse
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from loc3r.errors import ModelError
from loc3r.models.cut3r import (
    Cut3rConfig,
    load_cut3r,
    official_model_line,
    random_state_dict,
    save_official_checkpoint,
)
from loc3r.models.cut3r.checkpoint import parse_model_line

TINY = Cut3rConfig.tiny()


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return random_state_dict(TINY, seed=0)


@pytest.fixture()
def tiny_ckpt(tmp_path: Path, tiny_sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "cut3r_tiny.pth"
    save_official_checkpoint(tiny_sd, official_model_line(TINY), path)
    return path


def test_load_official_layout(
    tiny_ckpt: Path, tiny_sd: dict, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="loc3r.models.cut3r.checkpoint"):
        model = load_cut3r(tiny_ckpt)
    assert model.config == TINY
    assert model.skipped_keys == ("downstream_head.proj.weight", "mask_token")
    assert "skipped 2 unneeded keys" in caplog.text
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, tiny_sd[key]), key


def test_model_line_round_trip() -> None:
    args = parse_model_line(official_model_line(Cut3rConfig.real_512_dpt()))
    assert args["enc_num_heads"] == 16 and args["state_dec_num_heads"] == 16
    assert args["pos_embed"] == "RoPE100" and args["img_size"] == (512, 512)
    assert "depth_mode" not in args  # ('exp', -inf, inf) is not a literal


def test_yaml_model_line_parses() -> None:
    line = (
        "ARCroco3DStereo(ARCroco3DStereoConfig(freeze='encoder', state_size=768, state_pe='2d', "
        "pos_embed='RoPE100', rgb_head=True, pose_head=True,  img_size=(224, 224), "
        "head_type='linear', output_mode='pts3d+pose', depth_mode=('exp', -inf, inf), "
        "conf_mode=('exp', 1, inf), pose_mode=('exp', -inf, inf), enc_embed_dim=1024, "
        "enc_depth=24, enc_num_heads=16, dec_embed_dim=768, dec_depth=12, dec_num_heads=12))"
    )
    args = parse_model_line(line)
    assert args["head_type"] == "linear" and args["dec_num_heads"] == 12
    assert "state_dec_num_heads" not in args  # reference default 16 applies


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_args_as_plain_string_and_module_prefix(tmp_path: Path, tiny_sd: dict) -> None:
    sd = {f"module.{k}": v for k, v in tiny_sd.items()}
    model = load_cut3r(_save(tmp_path / "a.pth", {"model": sd, "args": official_model_line(TINY)}))
    assert model.config == TINY and model.skipped_keys == ()


def test_args_as_unimportable_omegaconf_object(tmp_path: Path, tiny_sd: dict) -> None:
    """OmegaConf's classes are not importable at load time: the line is still found."""
    fake = types.ModuleType("omegaconf_fake_for_test")

    class DictConfig:
        def __init__(self, content: dict) -> None:
            self._content = content

        def __getstate__(self) -> dict:
            return {"_content": self._content, "_metadata": object.__new__(Node)}

    class Node:
        pass

    for cls in (DictConfig, Node):
        cls.__module__ = fake.__name__
        cls.__qualname__ = cls.__name__
        setattr(fake, cls.__name__, cls)
    sys.modules[fake.__name__] = fake
    try:
        args = DictConfig({"model": official_model_line(TINY), "lr": 1e-4})
        path = _save(tmp_path / "omega.pth", {"model": tiny_sd, "args": args})
    finally:
        del sys.modules[fake.__name__]
    assert load_cut3r(path).config == TINY


def test_missing_args_falls_back_to_shapes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = Cut3rConfig.from_dict({**TINY.to_dict(), "enc_num_heads": 2, "dec_num_heads": 2,
                                    "state_dec_num_heads": 16, "enc_embed_dim": 128})
    path = _save(tmp_path / "noargs.pth", random_state_dict(config, seed=3))
    with caplog.at_level(logging.WARNING):
        model = load_cut3r(path)
    assert "using reference defaults" in caplog.text
    assert model.config.enc_embed_dim == 128 and model.config.state_size == 16
    assert model.config.state_dec_num_heads == 16


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("hello, not a checkpoint\n")
    with pytest.raises(ModelError) as err:
        load_cut3r(path)
    assert str(err.value) == (
        f"{path} is not a PyTorch checkpoint: "
        "pass an official CUT3R checkpoint such as cut3r_512_dpt_4_64.pth"
    )
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_cut3r(tmp_path / "absent.pth")


def test_truncated_checkpoint(tiny_ckpt: Path) -> None:
    data = tiny_ckpt.read_bytes()
    tiny_ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as err:
        load_cut3r(tiny_ckpt)
    assert str(err.value).startswith(f"{tiny_ckpt} is a truncated or corrupt PyTorch checkpoint")
    assert str(err.value).endswith(
        ": download it again or pass an official CUT3R checkpoint such as cut3r_512_dpt_4_64.pth"
    )


def test_dust3r_checkpoint_is_refused(tmp_path: Path) -> None:
    sd = {
        "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
        "dec_blocks.0.norm1.weight": torch.zeros(8),
        "dec_blocks2.0.norm1.weight": torch.zeros(8),
        "downstream_head1.proj.weight": torch.zeros(4, 8),
    }
    args = argparse.Namespace(model="AsymmetricCroCo3DStereo(CroCoNet(...))")
    path = _save(tmp_path / "dust3r.pth", {"model": sd, "args": args})
    with pytest.raises(ModelError) as err:
        load_cut3r(path)
    assert str(err.value) == (
        f"{path} is a DUSt3R/MASt3R checkpoint (two decoders, no CUT3R state tokens): "
        "pass an official CUT3R checkpoint such as cut3r_512_dpt_4_64.pth"
    )


def test_no_state_dict(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="holds no model state dict"):
        load_cut3r(_save(tmp_path / "empty.pth", {"epoch": 3}))


def test_missing_and_misshaped_keys_are_named(tmp_path: Path, tiny_sd: dict) -> None:
    sd = dict(tiny_sd)
    del sd["pose_token"]
    sd["dec_norm.weight"] = torch.zeros(7)
    path = tmp_path / "broken.pth"
    save_official_checkpoint(sd, official_model_line(TINY), path)
    with pytest.raises(ModelError) as err:
        load_cut3r(path)
    assert "missing pose_token" in str(err.value)
    assert "mis-shaped dec_norm.weight" in str(err.value)
