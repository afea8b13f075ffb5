"""Orientation soft-argmax and head shapes/units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loc3r.models.config import HeadsConfig, LLMConfig, Loc3rConfig
from loc3r.models.heads import Loc3rHeads, circular_soft_argmax, orientation_bin_centres


def test_bin_centres_are_symmetric_and_uniform() -> None:
    centres = orientation_bin_centres(36).numpy()
    assert centres[0] == pytest.approx(-math.pi + math.pi / 36)
    assert centres[-1] == pytest.approx(math.pi - math.pi / 36)
    np.testing.assert_allclose(np.diff(centres), 2 * math.pi / 36, rtol=1e-5)


@pytest.mark.parametrize("b", [0, 7, 18, 35])
def test_peaked_logits_give_the_bin_centre(b: int) -> None:
    logits = torch.full((36,), -50.0)
    logits[b] = 50.0
    assert float(circular_soft_argmax(logits)) == pytest.approx(float(orientation_bin_centres(36)[b]), abs=1e-6)


def test_wraps_around_pi() -> None:
    # Equal mass on the first and last bin: the circular mean is +-pi, not 0.
    logits = torch.full((36,), -50.0)
    logits[0] = logits[35] = 50.0
    assert abs(float(circular_soft_argmax(logits))) == pytest.approx(math.pi, abs=1e-5)
    # More mass on the last bin: just below +pi.
    logits[35] = 50.5
    theta = float(circular_soft_argmax(logits))
    assert math.pi - math.pi / 36 < theta < math.pi


def test_matches_hand_computed_mixture() -> None:
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7, -0.4])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum()
    t = -math.pi + (np.arange(6) + 0.5) * 2 * math.pi / 6
    expected = math.atan2((p * np.sin(t)).sum(), (p * np.cos(t)).sum())
    assert float(circular_soft_argmax(logits)) == pytest.approx(expected, abs=1e-6)


def test_batched_shapes_and_units() -> None:
    config = Loc3rConfig(model_id="t", llm=LLMConfig(hidden_size=32), heads=HeadsConfig(hidden_size=16, ori_bins=36))
    heads = Loc3rHeads(config, camera_dim=48)
    assert heads.project_camera(torch.randn(5, 48)).shape == (5, 32)
    xy, sigma, theta = heads.pose(torch.randn(4, 32), torch.randn(4, 32))
    assert xy.shape == (4, 2) and sigma.shape == (4,) and theta.shape == (4,)
    assert bool((sigma > 0).all())
    assert bool((theta.abs() <= math.pi).all())
    assert heads.bev(torch.randn(3, 7, 32)).shape == (3, 7, 2)
