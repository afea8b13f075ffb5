"""CUT3R, VGGT and SigLIP frame preprocessing against the reference arithmetic."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from loc3r.errors import InputError
from loc3r.runtime.preprocess import cut3r_crop_box, cut3r_input, siglip_input, vggt_input

CUT3R_MIRROR = Path("/work/.mirror/CUT3R+CUT3R/repo")
CUT3R_IMAGE_PY = "src/dust3r/utils/image.py"
# facebookresearch/vggt at 44b3afb, read from a fork whose only later commit edits .gitignore
VGGT_MIRROR = (Path("/work/.mirror/xianglic+vggt/repo"), "44b3afb")
VGGT_LOAD_FN_PY = "vggt/utils/load_fn.py"


def _frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise, so resampling filters matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1), 128 + 0 * xx], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _reference_cut3r(rgb: np.ndarray, size: int = 512, square_ok: bool = False) -> torch.Tensor:
    """CUT3R ``load_images`` arithmetic (size != 224), restated on PIL."""
    img = Image.fromarray(rgb)
    S = max(img.size)
    interp = PIL.Image.LANCZOS if S > size else PIL.Image.BICUBIC
    img = img.resize(tuple(int(round(x * size / S)) for x in img.size), interp)
    W, H = img.size
    cx, cy = W // 2, H // 2
    halfw, halfh = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
    if not square_ok and W == H:
        halfh = 3 * halfw / 4
    img = img.crop((cx - halfw, cy - halfh, cx + halfw, cy + halfh))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)  # ToTensor
    return (x - 0.5) / 0.5  # Normalize(0.5, 0.5)


SIZES = [(240, 320), (320, 240), (300, 300), (512, 512), (301, 457), (457, 301), (1080, 1920), (1920, 1080), (97, 131), (100, 100), (383, 512)]


@pytest.mark.parametrize("h, w", SIZES)
def test_cut3r_matches_reference_arithmetic(h: int, w: int) -> None:
    rgb = _frame(h, w)
    out = cut3r_input(rgb)
    ref = _reference_cut3r(rgb)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "h, w, expected",
    [
        (480, 640, (384, 512)),  # landscape 4:3
        (640, 480, (512, 384)),  # portrait
        (720, 1280, (288, 512)),  # 16:9: 512 x 288
        (300, 300, (384, 512)),  # square -> 4:3 crop
        (301, 457, (336, 512)),  # odd: resized 512 x 337 -> crop 336
    ],
)
def test_cut3r_shapes(h: int, w: int, expected: tuple[int, int]) -> None:
    out = cut3r_input(_frame(h, w))
    assert out.shape == (3, *expected)
    assert out.shape[1] % 16 == 0 and out.shape[2] % 16 == 0


def test_cut3r_square_ok_keeps_square() -> None:
    assert cut3r_input(_frame(300, 300), square_ok=True).shape == (3, 512, 512)


def test_cut3r_value_mapping() -> None:
    for level, value in [(0, -1.0), (255, 1.0), (128, 128 / 255 * 2 - 1)]:
        out = cut3r_input(np.full((64, 96, 3), level, np.uint8))
        assert out.min().item() == pytest.approx(value, abs=1e-6) == out.max().item()
    out = cut3r_input(_frame(200, 300))
    assert -1.0 <= out.min().item() and out.max().item() <= 1.0


def test_cut3r_crop_box_square_rule_stays_on_patch_grid() -> None:
    assert cut3r_crop_box(512, 512) == (0, 64, 512, 448)  # the reference's 512 x 384
    # long side 500: the reference would give height 372 (not a multiple of 16); we floor to 368
    x0, y0, x1, y1 = cut3r_crop_box(500, 500)
    assert (x1 - x0, y1 - y0) == (496, 368)
    assert cut3r_input(_frame(100, 100), long_side=500).shape == (3, 368, 496)


def test_cut3r_other_patch_and_long_side() -> None:
    out = cut3r_input(_frame(480, 640), long_side=448, patch=14)
    assert out.shape == (3, 336, 448) and out.shape[1] % 14 == 0


def test_cut3r_rejects_degenerate_frames() -> None:
    with pytest.raises(InputError, match="too narrow"):
        cut3r_input(np.zeros((4, 1000, 3), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        cut3r_input(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="RGB uint8"):
        cut3r_input(np.zeros((10, 10), np.uint8))


def _reference_functions(mirror: Path, rev: str, path: str, names: tuple[str, ...], namespace: dict) -> dict | None:
    """The top-level functions ``names`` of ``path`` at ``rev`` in a local mirror, defined in
    ``namespace`` (which stands in for the file's imports), or None when unavailable."""
    git = shutil.which("git")
    if git is None or not mirror.exists():
        return None
    result = subprocess.run([git, "-C", str(mirror), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    tree = ast.parse(result.stdout)
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    exec(compile(ast.Module(body=wanted, type_ignores=[]), path, "exec"), namespace)
    return namespace


def _load_reference_load_images():
    """CUT3R's own ``load_images`` from the local mirror (torchvision's ToTensor + Normalize
    stand-in for ``ImgNorm``; cv2/torchvision imports dropped), or None when unavailable."""
    namespace = {
        "os": os,
        "np": np,
        "PIL": PIL,
        "exif_transpose": lambda img: img,
        "heif_support_enabled": False,
        "ImgNorm": lambda img: torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5),
    }
    found = _reference_functions(CUT3R_MIRROR, "HEAD", CUT3R_IMAGE_PY, ("_resize_pil_image", "load_images"), namespace)
    return found and found["load_images"]


def test_cut3r_matches_reference_function(tmp_path: Path) -> None:
    load_images = _load_reference_load_images()
    if load_images is None:
        pytest.skip("CUT3R reference mirror not available")
    paths = []
    for i, (h, w) in enumerate(SIZES):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.fromarray(_frame(h, w, seed=i)).save(paths[-1])
    views = load_images(paths, size=512, verbose=False)
    for (h, w), view, seed in zip(SIZES, views, range(len(SIZES))):
        assert torch.equal(cut3r_input(_frame(h, w, seed=seed)), view["img"][0]), (h, w)


# --- VGGT -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "expected"),
    [(1080, 1920, (294, 518)), (480, 640, (392, 518)), (1920, 1080, (518, 518)), (518, 518, (518, 518)), (97, 131, (378, 518))],
)
def test_vggt_shapes(h: int, w: int, expected: tuple[int, int]) -> None:
    assert tuple(vggt_input(_frame(h, w)).shape) == (3, *expected)


def test_vggt_value_mapping_and_portrait_centre_crop() -> None:
    frame = _frame(1920, 1080)
    full = np.asarray(Image.fromarray(frame).resize((518, 924), PIL.Image.BICUBIC))  # 1920 * 518 / 1080 -> 66 rows of 14
    expected = torch.from_numpy(full[203 : 203 + 518].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(vggt_input(frame), expected)


def test_vggt_other_width_and_degenerate_frames() -> None:
    assert tuple(vggt_input(_frame(1080, 1920), width=224).shape) == (3, 126, 224)
    with pytest.raises(InputError, match="too flat"):
        vggt_input(np.zeros((2, 1000, 3), np.uint8))


def _load_reference_vggt_preprocess():
    """VGGT's own ``load_and_preprocess_images`` from the local mirror (a ToTensor stand-in for
    torchvision's), or None when unavailable."""
    to_tensor = lambda img: torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)  # noqa: E731
    namespace = {"torch": torch, "Image": PIL.Image, "TF": type("TF", (), {"ToTensor": staticmethod(lambda: to_tensor)})}
    found = _reference_functions(*VGGT_MIRROR, VGGT_LOAD_FN_PY, ("load_and_preprocess_images",), namespace)
    return found and found["load_and_preprocess_images"]


def test_vggt_matches_reference_function(tmp_path: Path) -> None:
    preprocess = _load_reference_vggt_preprocess()
    if preprocess is None:
        pytest.skip("VGGT reference mirror not available")
    for i, (h, w) in enumerate([(1080, 1920), (1920, 1080), (97, 131), (518, 518)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(_frame(h, w, seed=i)).save(path)
        assert torch.equal(vggt_input(_frame(h, w, seed=i)), preprocess([str(path)])[0]), (h, w)


# --- SigLIP -----------------------------------------------------------------------------


def _reference_siglip(rgb: np.ndarray, size: int = 384) -> np.ndarray:
    """LLaVA-Video's SigLipImageProcessor steps: PIL bicubic squash, x / 255, (x - 0.5) / 0.5."""
    resized = np.asarray(Image.fromarray(rgb).resize((size, size), PIL.Image.BICUBIC))
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def test_siglip_matches_pil_bicubic() -> None:
    frames = [_frame(240, 320), _frame(512, 288, seed=1), _frame(384, 384, seed=2), _frame(97, 131, seed=3)]
    out = siglip_input(frames)
    assert out.shape == (4, 3, 384, 384) and out.dtype == torch.float32
    assert -1.0 <= out.min().item() and out.max().item() <= 1.0
    for got, rgb in zip(out, frames):
        np.testing.assert_allclose(got.numpy(), _reference_siglip(rgb), rtol=0, atol=1e-6)


def test_siglip_accepts_a_stacked_array() -> None:
    stacked = np.stack([_frame(48, 64), _frame(48, 64, seed=1)])
    assert torch.equal(siglip_input(stacked), siglip_input(list(stacked)))


def test_siglip_other_size_and_tiny_frames() -> None:
    out = siglip_input([np.full((3, 3, 3), 255, np.uint8)], size=224)
    assert out.shape == (1, 3, 224, 224)
    assert torch.allclose(out, torch.ones_like(out))


def test_siglip_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        siglip_input([])
    with pytest.raises(ValueError, match="RGB uint8"):
        siglip_input([np.zeros((10, 10, 4), np.uint8)])


# --- scaling in the decoder -------------------------------------------------------------


@pytest.fixture(scope="module")
def decoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """Decoded frames (``Frame`` over the decoder's picture) of demo videos at three sizes."""
    from loc3r.runtime.demo_video import write_demo_video
    from loc3r.runtime.video import iter_frames

    folder = tmp_path_factory.mktemp("decoded")
    sizes = {"640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}
    return {name: list(iter_frames(write_demo_video(folder / f"{name}.mp4", 6, w, h), 3)) for name, (w, h) in sizes.items()}


def _grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten() * 127.5  # inputs are in [-1, 1]: one grey level is 1/127.5


@pytest.mark.parametrize("name", ["640x480", "1280x720", "1920x1080"])
def test_decoder_scaling_stays_within_its_bound_of_pil(decoded: dict[str, list], name: str) -> None:
    """swscale (on the YUV planes, for shrinks to <= 1/2 a side) against PIL on the full RGB
    frame: mean <= 1.5, 99th percentile <= 4, max <= 16 grey levels (measured 1.3, 3, 13);
    other sizes take the PIL route and are exact."""
    for frame in decoded[name]:
        for ours, reference in (
            (cut3r_input(frame), cut3r_input(frame.rgb)),
            (siglip_input([frame])[0], siglip_input([frame.rgb])[0]),
        ):
            assert ours.shape == reference.shape
            levels = _grey_levels(ours, reference)
            assert levels.mean() <= 1.5 and levels.quantile(0.99) <= 4 and levels.max() <= 16
    frame = decoded[name][0]
    if name == "640x480":  # CUT3R 512x384, SigLIP 384x384: less than a halving, the PIL route
        assert torch.equal(cut3r_input(frame), cut3r_input(frame.rgb))
    if name != "1920x1080":  # SigLIP 384x384 from 720 or 480 rows: the PIL route
        assert torch.equal(siglip_input([frame]), siglip_input([frame.rgb]))


def test_decoded_frames_keep_rotation_when_scaled(tmp_path: Path) -> None:
    import av

    from loc3r.runtime.video import iter_frames

    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 1024, 768, "yuv420p"
        stream.set_display_rotation(90)
        rgb = np.full((768, 1024, 3), 60, np.uint8)
        rgb[:384, :512] = 255  # white top-left quadrant, stored
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    frame = next(iter(iter_frames(path, 1)))
    assert frame.size == (768, 1024) and frame.rgb.shape == (1024, 768, 3)
    small = frame.resized(384, 512, Image.Resampling.LANCZOS)  # a halving: the decoder route
    assert small.shape == (512, 384, 3)
    np.testing.assert_allclose(small.astype(float), np.asarray(Image.fromarray(frame.rgb).resize((384, 512), Image.Resampling.LANCZOS)), atol=16)


def test_siglip_equals_transformers_processor_bit_for_bit() -> None:
    """The numpy path (no transformers at run time) gives exactly what LLaVA-Video's processor,
    configured in transformers, gives on the same resized frames."""
    from transformers import SiglipImageProcessorPil
    from transformers.image_utils import PILImageResampling

    processor = SiglipImageProcessorPil(
        size={"height": 384, "width": 384}, resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    frames = [_frame(240, 320), _frame(97, 131, seed=3)]
    resized = [np.asarray(Image.fromarray(f).resize((384, 384), Image.Resampling.BICUBIC)) for f in frames]
    expected = processor(images=resized, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    assert np.array_equal(siglip_input(frames).numpy(), expected)
