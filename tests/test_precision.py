"""The PyTorch model's device and dtype: the checkpoint's on a GPU, chosen per machine on a
CPU (or given with --dtype), loaded tensor by tensor in that dtype, and reported by --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_checkpoints import next_folder, write_cut3r_file
from loc3r.errors import InputError
from loc3r.models.bundle import load_bundle, weight_files
from loc3r.models.convert_cli import main as convert_main
import loc3r.models.precision as precision_module
from loc3r.models.precision import WeightStats, choose_precision, weight_stats
from loc3r.runtime import cli as run_cli
from loc3r.runtime.demo_video import write_demo_video

GB = 10**9
LLAVA_VIDEO_7B = WeightStats(8_500_000_000, torch.bfloat16)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("stats", "device", "available", "cpu_bf16", "dtype", "reason"),
    [
        (LLAVA_VIDEO_7B, CUDA, 0, False, torch.bfloat16, "cuda: the checkpoint's bfloat16"),
        (WeightStats(8_500_000_000, torch.float16), CUDA, 0, False, torch.float16, "cuda: the checkpoint's float16"),
        (LLAVA_VIDEO_7B, CPU, 22 * GB, False, torch.bfloat16,
         "cpu: bfloat16, as float32 weights (34.0 GB) would not fit in 75% of the 22.0 GB available"),
        (LLAVA_VIDEO_7B, CPU, 128 * GB, False, torch.float32, "cpu: float32 (exact reference; 34.0 GB of weights, 128.0 GB"),
        (LLAVA_VIDEO_7B, CPU, 128 * GB, True, torch.bfloat16, "cpu with bfloat16 units: the checkpoint's bfloat16"),
        (WeightStats(8_500_000_000, torch.float32), CPU, 22 * GB, False, torch.bfloat16, "cpu: bfloat16, as float32"),
        (WeightStats(8_500_000_000, torch.float16), CPU, 22 * GB, True, torch.float16, "cpu: float16, as float32"),
    ],
)
def test_choice_per_device(stats, device, available, cpu_bf16, dtype, reason) -> None:
    precision = choose_precision(stats, "auto", device, available, cpu_bf16)
    assert (precision.dtype, precision.device) == (dtype, device)
    assert precision.reason.startswith(reason), precision.reason


def test_requested_dtype_wins_and_unknown_is_refused() -> None:
    precision = choose_precision(LLAVA_VIDEO_7B, "float16", CPU, 128 * GB, False)
    assert (precision.dtype, precision.reason) == (torch.float16, "--dtype float16")
    with pytest.raises(InputError, match="--dtype 'int3' is not known"):
        choose_precision(LLAVA_VIDEO_7B, "int3")


@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-NeXT checkpoint converted with --dtype bfloat16."""
    root = tmp_path_factory.mktemp("bf16")
    folder, _ = next_folder(root)
    cut3r, _ = write_cut3r_file(root)
    out = root / "bundle"
    assert convert_main(["--llava", str(folder), "--cut3r", str(cut3r), "--out", str(out), "--vision-heads", "2",
                         "--dtype", "bfloat16"]) == 0
    return out


def floating(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.is_floating_point()]


def test_bundle_loads_in_the_chosen_dtype(bf16_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stats = weight_stats(weight_files(bf16_bundle), "re-create the bundle")
    assert stats.dtype == torch.bfloat16 and stats.parameters > 0
    as_checkpoint = load_bundle(bf16_bundle, "bfloat16")
    assert {p.dtype for p in floating(as_checkpoint.model)} == {torch.bfloat16}
    monkeypatch.setattr(precision_module, "has_cpu_bf16", lambda: True)
    native = load_bundle(bf16_bundle)  # a CPU with bfloat16 units keeps the checkpoint's bfloat16
    assert native.precision.dtype == torch.bfloat16 and native.precision.reason.startswith("cpu with bfloat16 units")
    assert {p.dtype for p in floating(native.model)} == {torch.bfloat16}
    monkeypatch.setattr(precision_module, "has_cpu_bf16", lambda: False)
    auto = load_bundle(bf16_bundle)  # without them, plenty of memory for a tiny model: float32
    assert auto.precision.dtype == torch.float32 and auto.precision.reason.startswith("cpu: float32")
    assert {p.dtype for p in floating(auto.model)} == {torch.float32}
    for ours, theirs in zip(floating(as_checkpoint.model), floating(auto.model), strict=True):
        assert torch.equal(ours.float(), theirs)  # the same bfloat16 values, widened


def test_load_parts_leaves_the_rest_on_meta(bf16_bundle: Path) -> None:
    model = load_bundle(bf16_bundle).load_parts(("vision", "heads"), torch.float32)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.vision.parameters())
    assert all(p.device.type == "meta" for p in model.llm.parameters())
    assert all(p.device.type == "meta" for p in model.camera_encoder.parameters())


@pytest.mark.parametrize(("dtype", "expected", "reason"), [("auto", "float32", "cpu: float32"), ("bfloat16", "bfloat16", "--dtype bfloat16")])
def test_json_reports_the_dtype_that_ran(tmp_path: Path, capsys, dtype: str, expected: str, reason: str) -> None:
    video = write_demo_video(tmp_path / "v.mp4", num_frames=6, width=160, height=120)
    code = run_cli.main([str(video), "Where am I?", "--frames", "2", "--max-new-tokens", "2", "--json", "--no-cache",
                         "--dtype", dtype])
    out = capsys.readouterr().out
    assert code == 0, out
    model = json.loads(out.strip().splitlines()[-1])["model"]
    assert (model["dtype"], model["device"]) == (expected, "cpu")
    assert model["dtype_reason"].startswith(reason)
