"""loc3r-bench: the result schema, ratios of medians, stats, RSS, the plot, the small preset.

Nothing here asserts a duration: performance is measured by the benchmark, not by tests.
"""

from __future__ import annotations

import json
import math
import random
import struct
import time
from argparse import Namespace
from pathlib import Path

import pytest

from loc3r.bench.cli import BASELINES, assemble, main
from loc3r.bench.measure import STAGES
from loc3r.bench.memory import RssSampler, current_rss_mib, peak_rss_mib
from loc3r.bench.presets import small_config, small_cut3r
from loc3r.bench.provenance import Recording
from loc3r.bench.report import machine_info, render_markdown, write_plot
from loc3r.bench.stats import ratio, ratios, summarize, summarize_runs
from loc3r.models.cut3r import Cut3rConfig
from loc3r.models.tiny import tiny_config
from loc3r.models.tokenizer import TextTokenizer
from loc3r.models.vision import vision_tokens_per_frame

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_runs(scale: float, n: int = 3) -> list[dict[str, float]]:
    return [{stage: scale * (k + 1) * (i + 1) for k, stage in enumerate(STAGES)} for i in range(n)]


@pytest.fixture
def doc(tiny_tokenizer: TextTokenizer) -> dict:
    config = tiny_config(tiny_tokenizer.vocab_size)
    args = Namespace(model="tiny", frames=32, warmup=1, decode_tokens=8, target=["cpu"])
    runs = {
        "transformers": fake_runs(3.0),
        "transformers_prefix_cache": fake_runs(2.0),
        "torch": fake_runs(1.0),
        "onnxruntime": fake_runs(0.5),
    }
    memory = {"phases": {"baseline": {"start_rss_mib": 1.0, "peak_rss_mib": 2.0, "growth_mib": 1.0}}, "process_peak_rss_mib": 2.0}
    formats = {
        **dict.fromkeys(BASELINES, "torch fp32 (transformers generate, SDPA)"),
        "torch": "torch fp32",
        "onnxruntime": "onnxruntime int4 layers",
    }
    doc = assemble(args, "loc3r-bench --model tiny", machine_info(), config, runs, memory, 28.0, formats, (384, 512), 3)
    doc["provenance"] = Recording("bench_tiny", ["loc3r-bench", "--model", "tiny"], "A B A B", 3, allow_unreachable=True).finish()
    return doc


def test_summarize_known_values() -> None:
    s = summarize([3.0, 1.0, 10.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    assert summarize([5.0]).median == 5.0
    with pytest.raises(ValueError):
        summarize([])


def test_ratios_of_medians() -> None:
    base = summarize_runs([{"a": 4.0, "b": 1.0}, {"a": 6.0, "b": 3.0}, {"a": 5.0, "b": 2.0}])
    opt = summarize_runs([{"a": 1.0, "b": 0.0}, {"a": 3.0, "b": 0.0}, {"a": 2.0, "b": 0.0}])
    assert ratios(base, opt) == {"a": 2.5, "b": None}
    assert ratio(6.0, 2.0) == 3.0


def test_result_schema_and_ratios(doc: dict) -> None:
    assert set(doc["baselines"]) == set(BASELINES) and set(doc["optimized"]) == {"torch", "onnxruntime"}
    for side in (*doc["baselines"].values(), *doc["optimized"].values()):
        assert set(side["stages"]) == set(STAGES)
        for summary in side["stages"].values():
            assert summary["min"] <= summary["median"] <= summary["max"]
        assert side["decode_tokens_per_s"] == pytest.approx(1.0 / side["stages"]["decode_token"]["median"])
        assert side["llm_format"] and side["label"]
    for base, per_backend in doc["ratios"].items():
        for backend, stage_ratios in per_backend.items():
            assert set(stage_ratios) == set(STAGES)
            for stage, value in stage_ratios.items():
                expected = doc["baselines"][base]["stages"][stage]["median"] / doc["optimized"][backend]["stages"][stage]["median"]
                assert value == pytest.approx(expected)
    assert doc["ratios"]["transformers"]["torch"]["ttft_cold"] == pytest.approx(3.0)
    assert doc["ratios"]["transformers_prefix_cache"]["torch"]["ttft_cold"] == pytest.approx(2.0)
    assert doc["ratios"]["transformers"]["onnxruntime"]["encode_3d"] == pytest.approx(6.0)
    assert doc["optimized"]["onnxruntime"]["llm_format"] == "onnxruntime int4 layers"
    assert doc["model"]["random_weights"] is True
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["versions"]["torch"]
    assert {"git_commit", "code_commit", "code_dirty", "dirty_files"} <= set(doc["machine"])
    assert doc["floor"][0]["target"] == "cpu" and doc["floor"][0]["ttft_cold_s"] > 0
    json.dumps(doc)  # serialisable
    text = render_markdown(doc)
    assert "RANDOM" in text and "loc3r onnxruntime vs transformers + prefix cache" in text
    assert "**loc3r onnxruntime**: onnxruntime int4 layers" in text and "stand-in" not in text.lower()
    assert all(f"| {stage} |" in text for stage in STAGES)
    assert "Command: `loc3r-bench --model tiny`" in text and "load average (1, 5, 15 min) before" in text and "CPU-s" in text


def test_code_provenance_outside_a_checkout_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loc3r.bench import report

    monkeypatch.setattr(report, "_git", lambda *args: None)  # not a checkout (an installed wheel)
    assert report.code_provenance() == {"git_commit": None, "code_commit": None, "code_dirty": None, "dirty_files": []}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_is_png_of_requested_size(doc: dict, tmp_path: Path) -> None:
    path = write_plot(doc, tmp_path / "bench.png", (640, 360))
    assert png_size(path) == (640, 360)
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # no temporary left behind


def test_rss_readings_are_positive() -> None:
    assert 0 < current_rss_mib() <= peak_rss_mib()
    with RssSampler(interval_s=0.001) as sampler, sampler.phase("alloc"):
        block = bytearray(32 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
    entry = sampler.phases["alloc"]
    assert entry["start_rss_mib"] > 0 and entry["peak_rss_mib"] >= entry["start_rss_mib"]
    assert entry["growth_mib"] == pytest.approx(entry["peak_rss_mib"] - entry["start_rss_mib"])


def test_small_preset_has_the_real_token_geometry(tiny_tokenizer: TextTokenizer) -> None:
    config = small_config(tiny_tokenizer.vocab_size)
    assert config.vision.grid == 27
    assert vision_tokens_per_frame(config) == 210
    assert config.num_frames == 32 and config.cut3r_long_side == 512 and config.heads.ori_bins == 36
    cut3r = Cut3rConfig.from_dict(config.cut3r)
    assert cut3r == small_cut3r()
    assert (cut3r.state_size, cut3r.local_mem_size) == (768, 256)
    assert (384 // cut3r.patch_size) * (512 // cut3r.patch_size) == 768
    assert config.random_weights


class LoadedClock:
    """``time.perf_counter`` on a machine under load: every reading jumps ahead by a random
    0-0.5 s (other processes ran meanwhile), so two runs of the same work differ by far
    more than a decode step takes."""

    def __init__(self, seed: int) -> None:
        self.now, self.random = 0.0, random.Random(seed)

    def __call__(self) -> float:
        self.now += self.random.uniform(0.0, 0.5)
        return self.now


def test_per_token_never_divides_by_a_clock_that_stood_still() -> None:
    from loc3r.bench.measure import per_token
    from loc3r.errors import InternalError

    assert per_token([1.0, 1.5, 3.0]) == pytest.approx(1.0)
    for stamps in ([2.0, 2.0], [2.0, 1.0], [1.0], [1.0, math.nan]):
        with pytest.raises(InternalError):
            per_token(stamps)


def test_the_baseline_times_decode_from_its_token_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline's decode step is read from the times ``generate`` streamed its tokens:
    with a clock that ticks one second per reading it is exactly 1 s (the prefill before
    the first token is not in it), and under a noisy clock it stays positive and finite."""
    import torch

    from loc3r.bench.baseline import Baseline
    from loc3r.models.bundle import load_bundle
    from loc3r.models.tiny import resolve_model

    baseline = Baseline(load_bundle(resolve_model("tiny")))
    prompt = torch.randn(1, 12, baseline.config.llm.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.05
    ticks = iter(range(10**6))
    with torch.inference_mode():
        cache = baseline.prefix_cache(prompt[0, :8])
        monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
        assert baseline.decode_per_token(prompt, cache, 5) == 1.0
        for seed in range(10):
            monkeypatch.setattr(time, "perf_counter", LoadedClock(seed))
            assert 0 < baseline.decode_per_token(prompt, cache, 3) < math.inf


def test_cli_end_to_end_writes_every_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also on a loaded machine (a noisy clock): every decode figure is measured from token
    times, so it is positive and finite whatever the load did between two runs."""
    monkeypatch.setattr(time, "perf_counter", LoadedClock(seed=3))
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--frames", "2", "--repeat", "1", "--warmup", "0", "--decode-tokens", "2",
            "--json", str(out / "b.json"), "--markdown", str(out / "b.md"), "--plot", str(out / "b.png"), "--plot-size", "400x300"]
    assert main(argv) == 0
    result = json.loads((out / "b.json").read_text())
    for side in (*result["baselines"].values(), result["optimized"]["torch"]):
        assert set(side["stages"]) == set(STAGES)
        assert all(0 < v < math.inf for v in (side["decode_tokens_per_s"], *(run["decode_token"] for run in side["runs"])))
    assert result["command"].startswith("loc3r-bench --model tiny")
    record = result["provenance"]
    assert record["command"] == result["command"] and record["result"] == "b" and record["repeats"] == 1
    assert record["cpu_s"] > 0 and len(record["load_before"]) == len(record["load_after"]) == 3
    assert result["memory"]["phases"]["baseline"]["peak_rss_mib"] > 0
    assert png_size(out / "b.png") == (400, 300)
    assert "RANDOM" in (out / "b.md").read_text()


@pytest.mark.parametrize("bad", [["--frames", "0"], ["--repeat", "0"], ["--plot-size", "big"], ["--decode-tokens", "1"]])
def test_cli_rejects_bad_arguments(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "tiny", *bad]) == 2
    assert "loc3r-bench: error:" in capsys.readouterr().err


def test_cli_rejects_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--backend", "nope"])
    assert exit_info.value.code == 2
    assert "loc3r-bench: error:" in capsys.readouterr().err


def layout_bundle(tmp_path: Path, newline_position: str) -> Path:
    """The tiny bundle with another newline position (the weights do not depend on it)."""
    import shutil

    from loc3r.models.tiny import resolve_model

    folder = tmp_path / newline_position
    shutil.copytree(resolve_model("tiny"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"newline_position": newline_position}))
    return folder


@pytest.mark.parametrize("newline_position", ["grid", "frame", "one_token"])
def test_the_transformers_baseline_computes_what_our_runtime_computes(tmp_path: Path, newline_position: str) -> None:
    """Like with like: the baseline's llava-onevision shares the bundle's weights, its
    layout (newlines per row, per frame, or one after the video) equals our vision blocks
    and video end, and its LLM gives our LLM's logits."""
    import torch

    from loc3r.bench.baseline import Baseline
    from loc3r.models.bundle import load_bundle
    from loc3r.models.llm import TorchLLM

    bundle = load_bundle(layout_bundle(tmp_path, newline_position))
    baseline = Baseline(bundle)
    size = bundle.config.vision.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cameras = list(torch.randn(2, bundle.config.llm.hidden_size, generator=torch.Generator().manual_seed(2)))
    embeds = torch.randn(24, bundle.config.llm.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.05
    with torch.inference_mode():
        vision = bundle.model.vision.encode(pixels)
        torch.testing.assert_close(baseline.encode_vision(pixels), vision, rtol=0, atol=1e-5)
        ours_video = torch.cat([*(torch.cat([c[None], v]) for c, v in zip(cameras, vision)), bundle.model.vision.video_end()])
        torch.testing.assert_close(baseline.video_embeds(cameras, vision), ours_video, rtol=0, atol=0)
        theirs = baseline.model(inputs_embeds=embeds[None]).logits[0, -1]
    ours = TorchLLM(bundle.model.llm).prefill(embeds).last_logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert baseline.model.lm_head.weight.data_ptr() == bundle.model.llm.lm_head.weight.data_ptr()  # shared, not copied


def test_the_transformers_baseline_refuses_pooling_transformers_does_not_do(tmp_path: Path) -> None:
    from loc3r.bench.baseline import Baseline
    from loc3r.errors import InputError
    from loc3r.models.bundle import load_bundle

    folder = layout_bundle(tmp_path, "grid")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"spatial_pool_mode": "average"}))
    with pytest.raises(InputError, match="pools bilinear by 2; .* pools average by 2"):
        Baseline(load_bundle(folder))
