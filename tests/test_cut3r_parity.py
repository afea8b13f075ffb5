"""Parity with the reference CUT3R (commit 8bc15dc) on reproducible random weights.

Golden outputs were made by tests/fixtures/make_cut3r_fixtures.py (see
tests/fixtures/README.md). Each test writes the random weights as an official checkpoint,
loads it with ``load_cut3r`` and matches camera tokens, state and memory for every frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loc3r.models.cut3r import Cut3rConfig, load_cut3r, official_model_line, random_state_dict
from loc3r.models.cut3r import save_official_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "cut3r"
ATOL = 1e-4


def _check_case(name: str, tmp_path: Path) -> None:
    with safe_open(FIXTURES / f"{name}.safetensors", "pt") as f:
        meta = f.metadata()
        ref = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["reference_commit"] == "8bc15dc"
    config = Cut3rConfig.from_dict(json.loads(meta["config"]))
    path = tmp_path / f"{name}.pth"
    save_official_checkpoint(random_state_dict(config, int(meta["weight_seed"])),
                             official_model_line(config), path)
    model = load_cut3r(path)
    path.unlink()
    assert model.config == config
    count, height, width = (int(meta[k]) for k in ("frames", "height", "width"))
    gen = torch.Generator().manual_seed(int(meta["frames_seed"]))
    frames = torch.rand((count, 3, height, width), generator=gen) * 2 - 1
    s_stride, m_stride = int(meta["state_row_stride"]), int(meta["memory_row_stride"])
    state = None
    with torch.no_grad():
        for t in range(count):
            camera, state = model.step(frames[t : t + 1], state)
            feat, memory = state.state_feat[0], state.memory[0]
            rows_s = feat[::s_stride][: ref["state_rows"].shape[1]]
            rows_m = memory[::m_stride][: ref["memory_rows"].shape[1]]
            torch.testing.assert_close(camera[0], ref["camera"][t], atol=ATOL, rtol=0)
            torch.testing.assert_close(rows_s, ref["state_rows"][t], atol=ATOL, rtol=0)
            torch.testing.assert_close(rows_m, ref["memory_rows"][t], atol=ATOL, rtol=0)
            for key, value in (("state", feat), ("memory", memory)):
                value = value.double()
                for kind, total in (("sum", value.sum()), ("abs_sum", value.abs().sum())):
                    mean_err = abs(total.item() - ref[f"{key}_{kind}"][t].item()) / value.numel()
                    assert mean_err < ATOL / 10, (key, kind, t, mean_err)


def test_parity_tiny(tmp_path: Path) -> None:
    _check_case("tiny", tmp_path)


def test_parity_real_224_linear(tmp_path: Path) -> None:
    _check_case("real_224_linear", tmp_path)


@pytest.mark.slow  # same camera-path architecture as 224; only the image size differs
def test_parity_real_512_dpt(tmp_path: Path) -> None:
    _check_case("real_512_dpt", tmp_path)
