"""Target profiles: every shipped file loads, cites its numbers, and names resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loc3r.engines.targets import ALIASES, list_targets, load_target
from loc3r.engines import targets
from loc3r.errors import InputError
from loc3r.runtime.session import VISION_BATCH

EXPECTED = {"jetson-orin-agx", "jetson-orin-agx-32gb", "orin-nx", "orin-nano", "orin-nano-super", "x86-cuda", "cpu"}


def test_the_expected_targets_ship() -> None:
    assert EXPECTED <= set(list_targets())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_target_loads_with_sources(name: str) -> None:
    target = load_target(name)
    hw = target.hardware
    assert target.name == name and target.description
    assert hw.sources and all(s.startswith("https://") for s in hw.sources)
    assert hw.peak_tflops > 0 and hw.bandwidth_gbs > 0 and 0 <= hw.reserved_gb < hw.memory_gb
    assert target.backends
    lo, opt, hi = target.build.vision_frames
    assert 1 <= lo <= opt <= hi == VISION_BATCH  # encoder profiles end at the streaming batch
    if target.build.trt_version is not None:  # goes into engine file names
        assert re.fullmatch(r"\d+\.\d+", target.build.trt_version)
    if target.llm.weights in ("int4", "int8"):
        assert target.llm.block_size in (32, 64, 128)


def test_jetsons_use_tensorrt_10_3_fp16_on_sm87_without_dla() -> None:
    for name in ("jetson-orin-agx", "jetson-orin-agx-32gb", "orin-nx", "orin-nano", "orin-nano-super"):
        target = load_target(name)
        assert target.hardware.sm == "sm_87"
        assert target.build.trt_version == "10.3" and target.build.precision == "fp16"
        assert not target.build.dla and target.build.workspace_mib
        assert target.llm.weights == "int4"
        assert target.backends[0] == "tensorrt"


def test_published_bandwidths() -> None:
    assert load_target("jetson-orin-agx").hardware.bandwidth_gbs == 204.8
    assert load_target("jetson-orin-agx-32gb").hardware.bandwidth_gbs == 204.8
    assert load_target("orin-nx").hardware.bandwidth_gbs == 102.4
    assert load_target("orin-nano").hardware.bandwidth_gbs == 68.0
    assert load_target("orin-nano-super").hardware.bandwidth_gbs == 102.0
    assert load_target("x86-cuda").hardware.bandwidth_gbs == 1008.0


def test_cpu_runs_fp32_and_x86_cuda_fp16_llm() -> None:
    assert load_target("cpu").build.precision == "fp32"
    assert load_target("cpu").hardware.sm is None
    assert load_target("x86-cuda").llm.weights == "fp16"


def test_alias_is_the_agx_64gb() -> None:
    assert ALIASES["jetson-orin"] == "jetson-orin-agx"
    assert load_target("jetson-orin") == load_target("jetson-orin-agx")
    assert load_target("jetson-orin").hardware.memory_gb == 64


def test_unknown_target_lists_valid_names() -> None:
    with pytest.raises(InputError) as info:
        load_target("jetson-xavier")
    message = str(info.value)
    assert "jetson-xavier" in message
    for name in list_targets() + list(ALIASES):
        assert name in message


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_target_names_its_encoder_precision(name: str) -> None:
    """fp32 by default everywhere (the cpu profile says why, from its measurements); int8 is
    offered by every target, from the user's calibration frames on the TensorRT ones."""
    encoders = load_target(name).encoders
    assert encoders.default == "fp32" and encoders.available == ("fp32", "int8")
    assert encoders.int8_needs_calibration == (name != "cpu")
    assert ("--calibration" in encoders.note) == (name != "cpu")
    if name == "cpu":  # the measurements the choice rests on: quoted from the result file it names
        assert "benchmarks/results/fresh_small.md" in encoders.note
        quoted = re.findall(r"\d+\.\d+x", encoders.note)
        result = (Path(__file__).parent.parent / "benchmarks" / "results" / "fresh_small.md").read_text(encoding="utf-8")
        assert quoted and all(figure in result for figure in quoted), (quoted, "not all in fresh_small.md")


def test_an_encoder_default_the_target_does_not_offer_is_malformed() -> None:
    text = targets.resources.files("loc3r.engines").joinpath("cpu.toml").read_text(encoding="utf-8")
    data = targets.tomllib.loads(text)
    data["encoders"]["available"] = ["fp32"]
    data["encoders"]["default"] = "int8"
    with pytest.raises(ValueError, match=r"^encoders: default 'int8' must be one of available \('fp32',\) \(fp32, int8\)$"):
        targets._parse("cpu", data)
