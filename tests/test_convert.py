"""loc3r-convert on tiny checkpoints written in each published layout: bit-exact tensors,
transformers parity of the converted model, sharding, ``.bin`` input, heads and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from llava_checkpoints import (
    LLM_SIZES,
    NEXT_TO_T5,
    T5_TO_BUNDLE,
    TOWER_SIZES,
    VOCAB,
    assert_one_line_error,
    convert,
    hf_folder,
    next_folder,
    rename,
    write_cut3r_file,
)
from loc3r.models.bundle import load_bundle, weight_files
from loc3r.models.convert_cli import main
from loc3r.models.config import Loc3rConfig
from loc3r.models.cut3r import Cut3rConfig
from loc3r.models.heads import mlp

TOL = 1e-5


@pytest.fixture(scope="module")
def cut3r_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    return write_cut3r_file(tmp_path_factory.mktemp("cut3r"))


def bundle_tensors(bundle: Path) -> dict[str, torch.Tensor]:
    return {n: t for f in weight_files(bundle) for n, t in load_file(str(f)).items()}


def assert_bit_exact(bundle: Path, source_t5: dict[str, torch.Tensor], cut3r: dict[str, torch.Tensor]) -> None:
    """Every bundle tensor but the heads equals its source tensor, dtype included."""
    expected = {rename(n, T5_TO_BUNDLE): t for n, t in source_t5.items()}
    expected.update({"camera_encoder." + n: t for n, t in cut3r.items()})
    ours = bundle_tensors(bundle)
    compared = [n for n in ours if not n.startswith("heads.")]
    assert compared and all(n in expected for n in compared)
    for name in compared:
        assert ours[name].dtype == expected[name].dtype, name
        assert torch.equal(ours[name], expected[name]), name


# --- conversions --------------------------------------------------------------------------


@pytest.mark.parametrize(("names", "fmt"), [("t5", "safetensors"), ("t4", "bin")])
def test_hf_layout_round_trip_and_logits(tmp_path: Path, capsys, cut3r_file, names: str, fmt: str) -> None:
    folder, hf = hf_folder(tmp_path, names, fmt)
    out = tmp_path / "bundle"
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", out, "--max-shard-mb", "0.05")
    assert code == 0, err
    assert "video layout onevision: bilinear pooling, stride 2, newlines one_token: 4 vision tokens per frame " \
           "+ 1 after the video (the checkpoint's default)" in err
    assert (out / "model.safetensors.index.json").is_file() and len(weight_files(out)) > 2
    assert_bit_exact(out, hf.state_dict(), cut3r_file[1])

    bundle = load_bundle(out)
    config, model = bundle.config, bundle.model
    assert (config.localization, config.random_weights) == ("untrained", False)
    assert (config.spatial_pool_mode, config.spatial_pool_stride, config.newline_position) == ("bilinear", 2, "one_token")
    assert config.video_layout == "onevision"
    assert config.vision_select_layer == -1 and config.cut3r == Cut3rConfig.tiny().to_dict()
    assert bundle.tokenizer.pos_id < VOCAB and bundle.tokenizer.ori_id < VOCAB

    pixels = torch.rand(1, 2, 3, 56, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = torch.tensor([[5, 17, 3] + [hf.config.video_token_id] * (2 * 4 + 1) + [42, 8]])
    with torch.no_grad():
        hidden = hf.model.vision_tower(pixels[0], output_hidden_states=True).hidden_states[-1]
        assert (model.vision.features(pixels[0]) - hf.model.multi_modal_projector(hidden)).abs().max() < TOL
        reference = hf(input_ids=ids, pixel_values_videos=pixels).logits
        pooled = model.vision.pool(model.vision.features(pixels[0]))
        embeds = model.llm.get_input_embeddings()(ids)
        embeds[0, ids[0] == hf.config.video_token_id] = torch.cat((pooled.reshape(-1, 32), model.vision.image_newline[None]))
        logits = model.llm(inputs_embeds=embeds).logits
    assert (logits - reference).abs().max().item() < TOL


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_llava_next_layout_round_trip_and_parity(tmp_path: Path, capsys, cut3r_file, fmt: str) -> None:
    folder, state = next_folder(tmp_path, fmt)
    out = tmp_path / "bundle"
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", out, "--vision-heads", "2")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    t5 = {rename(n, NEXT_TO_T5) or n: t for n, t in state.items()}
    assert_bit_exact(out, t5, cut3r_file[1])

    model = load_bundle(out).model
    assert (model.config.vision.num_hidden_layers, model.config.vision_select_layer) == (3, -2)
    tower_prefix = "model.vision_tower.vision_tower.vision_model."
    tower = SiglipVisionModel(SiglipVisionConfig(**TOWER_SIZES)).eval()
    tower.load_state_dict({n[len(tower_prefix):]: t for n, t in state.items() if n.startswith(tower_prefix)})
    projector = mlp(64, 32, 32)
    projector.load_state_dict({n[len("model.mm_projector."):]: t for n, t in state.items() if n.startswith("model.mm_projector.")})
    llm = Qwen2ForCausalLM(Qwen2Config(**LLM_SIZES, rope_theta=10000.0)).eval()
    llm.load_state_dict({n: t for n, t in state.items() if n.startswith(("model.", "lm_head.")) and
                         not n.startswith(("model.vision_tower.", "model.mm_projector.", "model.image_newline"))})
    frames = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(2)) * 2 - 1
    embeds = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = projector(tower(frames, output_hidden_states=True).hidden_states[-1])
        assert (model.vision.features(frames) - reference).abs().max() < TOL
        assert (model.llm(inputs_embeds=embeds).logits - llm(inputs_embeds=embeds).logits).abs().max() < TOL


def test_heads_file_marks_bundle_trained(tmp_path: Path, capsys, cut3r_file) -> None:
    folder, _ = next_folder(tmp_path)
    camera_dim, width = Cut3rConfig.tiny().dec_embed_dim, LLM_SIZES["hidden_size"]
    torch.manual_seed(5)
    heads = {"f_cam": mlp(camera_dim, width, width), "f_pos": mlp(width, 16, 3),
             "f_ori": mlp(width, 16, 12), "f_bev": mlp(width, 16, 2)}
    tensors = {f"heads.{m}.{n}": t for m, module in heads.items() for n, t in module.state_dict().items()}
    save_file(tensors, str(tmp_path / "heads.safetensors"))
    out = tmp_path / "bundle"
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", out, "--vision-heads", "2",
                        "--loc3r-heads", tmp_path / "heads.safetensors", "--dtype", "float16", "--model-id", "loc3r-test")
    assert code == 0, err
    config = Loc3rConfig.load(out)
    assert (config.localization, config.model_id, config.heads.hidden_size, config.heads.ori_bins) == ("trained", "loc3r-test", 16, 12)
    ours = bundle_tensors(out)
    assert all(t.dtype == torch.float16 for t in ours.values() if t.is_floating_point())
    assert all(torch.equal(ours[n], t.half()) for n, t in tensors.items())
    assert load_bundle(out).model.heads.f_ori[2].out_features == 12


# --- errors -------------------------------------------------------------------------------


def test_not_a_llava_folder(tmp_path: Path, capsys, cut3r_file) -> None:
    out = tmp_path / "bundle"
    assert_one_line_error(*convert(capsys, "--llava", tmp_path, "--cut3r", cut3r_file[0], "--out", out), "no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert_one_line_error(*convert(capsys, "--llava", tmp_path, "--cut3r", cut3r_file[0], "--out", out), "bert", "not a LLaVA-Video")
    assert not out.exists()


def test_truncated_shard(tmp_path: Path, capsys, cut3r_file) -> None:
    folder, _ = next_folder(tmp_path)
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", tmp_path / "b", "--vision-heads", "2")
    assert_one_line_error(code, err, "truncated", shard.name)


def test_missing_tensor(tmp_path: Path, capsys, cut3r_file) -> None:
    folder, _ = next_folder(tmp_path)
    shard = folder / "model-00003-of-00003.safetensors"
    tensors = load_file(str(shard))
    dropped = next(n for n in tensors if n.startswith("model.layers."))
    save_file({n: t for n, t in tensors.items() if n != dropped}, str(shard))
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", tmp_path / "b", "--vision-heads", "2")
    assert_one_line_error(code, err, "missing tensors", dropped.replace("model.", "llm.model.", 1))


def test_misshaped_config_and_bad_cut3r(tmp_path: Path, capsys, cut3r_file) -> None:
    folder, _ = next_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", tmp_path / "b", "--vision-heads", "2")
    assert_one_line_error(code, err, "disagree with config.json", "mlp")
    (folder / "config.json").write_text(json.dumps(config))
    not_pth = tmp_path / "cut3r.pth"
    not_pth.write_text("hello")
    code, err = convert(capsys, "--llava", folder, "--cut3r", not_pth, "--out", tmp_path / "b", "--vision-heads", "2")
    assert_one_line_error(code, err, "not a PyTorch checkpoint")
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", tmp_path / "b")
    assert_one_line_error(code, err, "tiny-siglip", "--vision-heads")


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path, capsys, cut3r_file) -> None:
    folder, _ = next_folder(tmp_path)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", tmp_path / "precious", "--vision-heads", "2")
    assert_one_line_error(code, err, "is a folder loc3r did not write (it holds notes.txt)")
    assert (tmp_path / "precious" / "notes.txt").is_file()
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", folder, "--vision-heads", "2")
    assert_one_line_error(code, err, "is a folder loc3r did not write")
    assert (folder / "model.safetensors.index.json").is_file()


def test_pool_mode_override_and_rewrite(tmp_path: Path, capsys, cut3r_file) -> None:
    folder, _ = hf_folder(tmp_path, "t5", "safetensors")
    out = tmp_path / "bundle"
    for mode in ("bilinear", "average"):  # the second run replaces the first bundle
        code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", out, "--pool-mode", mode,
                            "--video-layout", "llava-video")
        assert code == 0, err
        assert "pooling" in err  # LLaVA-Video's defaults (the -hf config has none) are announced
    config = Loc3rConfig.load(out)
    assert (config.video_layout, config.spatial_pool_mode, config.newline_position) == ("llava-video", "average", "grid")
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", out, "--pool-mode", "average")
    assert_one_line_error(code, err, "--pool-mode average does not apply to the onevision layout")


def test_loc3r_tokens_must_fit_the_embedding(tmp_path: Path, capsys, cut3r_file) -> None:
    folder, _ = next_folder(tmp_path, vocab=301)  # 300 tokens + <Pos> fit, <Ori> does not
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r_file[0], "--out", tmp_path / "b", "--vision-heads", "2")
    assert_one_line_error(code, err, "token id 301", "301-row embedding", "<Pos>, <Ori>")


# --- VGGT as the 3D encoder ------------------------------------------------------------------


def test_vggt_checkpoint_becomes_the_3d_encoder(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from loc3r.models.vggt import VggtConfig, save_official_checkpoint as save_vggt
    from loc3r.models.vggt import random_state_dict as random_vggt

    folder, _ = next_folder(tmp_path)
    vggt = random_vggt(VggtConfig.tiny(), seed=4)
    save_vggt(vggt, tmp_path / "model.safetensors")
    out = tmp_path / "bundle"
    code, err = convert(capsys, "--llava", folder, "--vggt", tmp_path, "--out", out, "--vision-heads", "2")
    assert code == 0, err
    bundle = load_bundle(out)
    assert bundle.config.encoder_3d == "vggt" and bundle.config.vggt == VggtConfig.tiny().to_dict()
    tensors = bundle_tensors(out)
    for name, tensor in vggt.items():
        assert torch.equal(tensors["camera_encoder." + name], tensor), name
    assert tensors["heads.f_cam.0.weight"].shape == (LLM_SIZES["hidden_size"], 2 * VggtConfig.tiny().embed_dim)
    assert not any(n.startswith("camera_encoder.") and n.removeprefix("camera_encoder.") not in vggt for n in tensors)


def test_exactly_one_3d_encoder(tmp_path: Path, capsys, cut3r_file) -> None:  # noqa: ANN001
    folder, _ = next_folder(tmp_path)
    with pytest.raises(SystemExit) as both:
        main(["--llava", str(folder), "--cut3r", str(cut3r_file[0]), "--vggt", str(tmp_path), "--out", str(tmp_path / "b")])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as neither:
        main(["--llava", str(folder), "--out", str(tmp_path / "b")])
    assert neither.value.code == 2 and "one of the arguments --cut3r --vggt is required" in capsys.readouterr().err
    code, err = convert(capsys, "--llava", folder, "--vggt", cut3r_file[0], "--out", tmp_path / "b", "--vision-heads", "2")
    assert code == 2 and "so it is not a VGGT checkpoint" in err and "Traceback" not in err
