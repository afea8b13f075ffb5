"""The BEV picture: size, content, arrow direction, watermark, atomic write."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loc3r.runtime.result import Answer, ModelInfo, Pose


def answer(theta: float, random_weights: bool = True, points: bool = True) -> Answer:
    rng = np.random.default_rng(0)
    return Answer(
        question="Where am I?",
        situation="",
        text="",
        token_ids=[],
        pose=Pose(x=0.0, y=0.0, sigma=0.4, theta_rad=theta),
        model=ModelInfo("m", "c" * 64, random_weights, "untrained" if random_weights else "trained", "torch"),
        video={},
        bev_points=rng.uniform(-3, 3, size=(4, 9, 2)) if points else None,
    )


def red_mask(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return (rgb[..., 0] > 180) & (rgb[..., 1] < 120) & (rgb[..., 2] < 120)


def test_png_has_the_requested_size_and_content(tmp_path: Path) -> None:
    path = answer(0.0).plot(tmp_path / "bev.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (800, 800)
    assert np.asarray(image.convert("L")).std() > 10  # not blank
    assert [p.name for p in tmp_path.iterdir()] == ["bev.png"]  # no temp file left


@pytest.mark.parametrize("theta, direction", [(0.0, (1, 0)), (math.pi / 2, (0, -1)), (3 * math.pi / 4, (-1, -1))])
def test_arrow_points_along_theta(tmp_path: Path, theta: float, direction: tuple[int, int]) -> None:
    """The red pixels (dot + arrow) shift along theta's direction vs the opposite heading."""

    def red_centre(angle: float, name: str) -> np.ndarray:
        ys, xs = np.nonzero(red_mask(answer(angle, points=False).plot(tmp_path / name)))
        return np.array([xs.mean(), ys.mean()])  # image y grows downwards

    shift = red_centre(theta, "a.png") - red_centre(theta + math.pi, "b.png")
    for axis, sign in enumerate(direction):
        if sign:
            assert shift[axis] * sign > 40
        else:
            assert abs(shift[axis]) < 10


def test_random_weights_are_watermarked(tmp_path: Path) -> None:
    marked = np.asarray(Image.open(answer(0.3, random_weights=True).plot(tmp_path / "r.png")).convert("L"))
    clean = np.asarray(Image.open(answer(0.3, random_weights=False).plot(tmp_path / "t.png")).convert("L"))
    assert (marked != clean).mean() > 0.01


def test_the_legend_carries_the_confidence_when_calibrated(tmp_path: Path) -> None:
    import dataclasses

    plain = answer(0.3)
    calibrated = dataclasses.replace(plain, pose=dataclasses.replace(plain.pose, confidence={"within_0.5m": 0.4, "within_1.0m": 0.7}))
    a = np.asarray(Image.open(plain.plot(tmp_path / "a.png")).convert("L"))
    b = np.asarray(Image.open(calibrated.plot(tmp_path / "b.png")).convert("L"))
    rows = np.nonzero((a != b).any(axis=1))[0]
    assert rows.size and rows.max() - rows.min() < 40  # one legend line differs, nothing else moves
