"""The vision input size comes from the checkpoint's own facts, never from grid x patch.

At SigLIP-so400m's real geometry (384 input, patch 14, 27x27 grid: 378 != 384) a LLaVA-NeXT
checkpoint converted to a bundle must preprocess at 384 in the torch pipeline, the exported
ONNX vision graph and the onnxruntime backend, and match the LLaVA-NeXT reference
(``SigLipImageProcessor``: squash to 384x384, bicubic, mean = std = 0.5) through
transformers' SigLIP tower and projector.
"""

from __future__ import annotations

import json
from functools import partial, reduce
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.image_transforms import normalize, rescale, resize
from transformers.image_utils import ChannelDimension, PILImageResampling

from loc3r.engines.targets import load_target
from loc3r.export.exporter import ExportRequest, export_vision
from loc3r.models.bundle import load_bundle
from loc3r.models.convert_input_size import vision_input_size
from loc3r.runtime.onnx_backend import OrtVision
from loc3r.runtime.ort import open_session
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.session import Stages
from loc3r.runtime.torch_backend import torch_stages
from loc3r.runtime.video import Frame
from llava_checkpoints import assert_one_line_error, convert, hf_model, next_folder, write_cut3r_file

TOL = 1e-4


def llava_next_pixels(rgbs: list[np.ndarray], size: int) -> torch.Tensor:
    """LLaVA-NeXT's ``SigLipImageProcessor.preprocess`` at ``size`` (its transforms, in its order)."""
    first = ChannelDimension.FIRST
    steps = [
        partial(resize, size=(size, size), resample=PILImageResampling.BICUBIC, data_format=first, input_data_format=ChannelDimension.LAST),
        partial(rescale, scale=1 / 255, data_format=first, input_data_format=first),
        partial(normalize, mean=(0.5,) * 3, std=(0.5,) * 3, data_format=first, input_data_format=first),
    ]
    return torch.from_numpy(np.stack(reduce(lambda xs, f: [*map(f, xs)], steps, rgbs))).float()


def frames(count: int = 2) -> list[Frame]:
    rng = np.random.default_rng(4)
    return [Frame(i, i / 2, rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for i in range(count)]


@pytest.fixture(scope="module")
def cut3r_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    return write_cut3r_file(tmp_path_factory.mktemp("cut3r"))


@pytest.fixture(scope="module")
def real_geometry_bundle(tmp_path_factory: pytest.TempPathFactory, cut3r_file) -> tuple[Path, object]:
    """A tiny-width LLaVA-NeXT checkpoint at so400m's geometry (384 input, 27x27 patches of 14)."""
    root = tmp_path_factory.mktemp("next384")
    folder, _ = next_folder(root, image_size=384)
    out = root / "bundle"
    from loc3r.models.convert_cli import main

    assert main(["--llava", str(folder), "--cut3r", str(cut3r_file[0]), "--out", str(out), "--vision-heads", "2"]) == 0
    torch.manual_seed(0)
    return out, hf_model(image_size=384)  # the same seeded weights as the checkpoint


def reference_tokens(hf, rgbs: list[np.ndarray], size: int) -> torch.Tensor:
    """transformers' llava-onevision video features (196 per frame + one newline), newline dropped."""
    with torch.no_grad():
        features = hf.model.get_video_features(pixel_values_videos=llava_next_pixels(rgbs, size)[None]).pooler_output[0]
    return features[:-1].reshape(len(rgbs), -1, features.shape[-1])


def without_newlines(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(N, side * (side + 1), D) grid-newline layout -> (N, side * side, D)."""
    return tokens.reshape(tokens.shape[0], side, side + 1, -1)[:, :, :side].reshape(tokens.shape[0], side * side, -1)


def test_converted_llava_next_bundle_preprocesses_at_384(real_geometry_bundle) -> None:
    out, hf = real_geometry_bundle
    bundle = load_bundle(out)
    assert (bundle.config.vision.image_size, bundle.config.vision.patch_size, bundle.config.vision.grid) == (384, 14, 27)
    pipeline = Pipeline(bundle, Stages(*torch_stages(bundle)), "torch")
    session = pipeline.new_session("frames")
    decoded = frames()
    with torch.no_grad():
        blocks = pipeline.encode_frames(decoded, session).stacked()
    ours = without_newlines(blocks[:, 1:], 14)  # camera token first, then 14 rows of 14 + newline
    rgbs = [f.rgb for f in decoded]
    at_384 = (ours - reference_tokens(hf, rgbs, 384)).abs().max().item()
    at_378 = (ours - reference_tokens(hf, rgbs, 378)).abs().max().item()
    assert at_384 < TOL, at_384
    assert at_378 > 100 * TOL, at_378  # the size matters: 378 (grid x patch) is measurably wrong


def test_onnx_vision_graph_and_backend_take_384(real_geometry_bundle, tmp_path: Path) -> None:
    out, hf = real_geometry_bundle
    bundle = load_bundle(out)
    request = ExportRequest(bundle, load_target("cpu"), tmp_path, (384, 512), None)
    entry = export_vision(request, tmp_path)["vision"]
    assert entry["inputs"][0]["shape"] == ["frames", 3, 384, 384]
    assert entry["outputs"][0]["shape"] == ["frames", 14 * 15, 32]
    rgbs = [f.rgb for f in frames()]
    from loc3r.runtime.preprocess import siglip_input

    session = open_session(tmp_path / entry["file"])
    tokens = torch.from_numpy(OrtVision(session, np.zeros((0, 32), np.float32)).encode(siglip_input(rgbs, bundle.config.vision.image_size)))
    diff = (without_newlines(tokens, 14) - reference_tokens(hf, rgbs, 384)).abs().max().item()
    assert diff < TOL, diff


# --- where the size comes from ------------------------------------------------------------


@pytest.mark.parametrize(
    ("tower", "files", "expected"),
    [
        ("google/siglip-so400m-patch14-384", {}, 384),
        ("/local/models/siglip-so400m-patch14-384/", {}, 384),
        ("my-tower", {"preprocessor_config.json": {"size": {"height": 384, "width": 384}}}, 384),
        ("my-tower", {"preprocessor_config.json": {"size": [384, 384], "crop_size": {"height": 384, "width": 384}}}, 384),
        ("my-tower", {"preprocessor_config.json": {"do_center_crop": True, "size": {"shortest_edge": 400},
                                                   "crop_size": {"height": 384, "width": 384}}}, 384),
        ("my-tower", {"video_preprocessor_config.json": {"size": 384}}, 384),
        ("google/siglip-so400m-patch14-224", {}, 224),
    ],
)
def test_stated_sizes(tmp_path: Path, tower: str, files: dict[str, dict], expected: int) -> None:
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    assert vision_input_size(tmp_path, 14, expected // 14, tower) == expected


def test_given_size_and_config_size(tmp_path: Path) -> None:
    assert vision_input_size(tmp_path, 14, 27, "tiny", given=384) == 384
    assert vision_input_size(tmp_path, 14, None, config_size=384) == 384


@pytest.mark.parametrize(
    ("tower", "files", "config_size", "given", "words"),
    [
        ("tiny-siglip", {}, None, None, ("nothing states the vision tower's input size", "--vision-image-size")),
        ("siglip-so400m-patch14-384", {"preprocessor_config.json": {"size": 336}}, None, None,
         ("stated inconsistently", "preprocessor_config.json says 336", "says 384")),
        ("siglip-so400m-patch14-384", {}, None, 392, ("stated inconsistently", "--vision-image-size says 392")),
        ("siglip-so400m-patch16-384", {}, None, None, ("16-pixel patches, the weights 14",)),
        ("siglip-so400m-patch14-336", {}, None, None, ("336-pixel input, 24x24 patches", "holds 27x27")),
        ("x", {"preprocessor_config.json": {"size": {"height": 384, "width": 512}}}, None, None, ("384x512", "square")),
        ("x", {"preprocessor_config.json": {"size": "big"}}, None, None, ("'big' is not a size in pixels",)),
        ("x", {"preprocessor_config.json": {"resample": 3}}, None, None, ("has no 'size'",)),
    ],
)
def test_bad_or_missing_sizes(tmp_path: Path, tower: str, files: dict, config_size: int | None, given: int | None,
                              words: tuple[str, ...]) -> None:
    from loc3r.errors import ModelError

    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(ModelError) as caught:
        vision_input_size(tmp_path, 14, 27, tower, config_size, given)
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_convert_without_a_stated_size_is_one_line(tmp_path: Path, capsys, cut3r_file) -> None:
    folder, _ = next_folder(tmp_path, tower="tiny-siglip")
    args = ("--llava", folder, "--cut3r", cut3r_file[0], "--out", tmp_path / "b", "--vision-heads", "2")
    assert_one_line_error(*convert(capsys, *args), "nothing states the vision tower's input size", "--vision-image-size")
    code, err = convert(capsys, *args, "--vision-image-size", "56")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "config.json").read_text())["vision"]["image_size"] == 56
