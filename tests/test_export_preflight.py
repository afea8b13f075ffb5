"""loc3r-export's preflight: every requirement of the target and options is checked before
any graph is exported, and every problem is one line with its fix."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from loc3r.export import cli as export_cli
from loc3r.export import exporter, preflight
from loc3r.export.cli import llm_parity_line

PROG = "loc3r-export: error: "


@pytest.fixture
def no_export(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every export step records that it ran (none may, when the preflight refuses)."""
    ran: list[str] = []
    for name in ("export_camera", "export_vision", "export_heads", "export_llm"):
        monkeypatch.setattr(exporter, name, lambda *args, name=name, **kwargs: ran.append(name) or {})
    return ran


def without_genai(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a))


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("loc3r-export")]


def test_a_missing_llm_builder_is_refused_before_any_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_export: list[str]
) -> None:
    without_genai(monkeypatch)
    out = tmp_path / "orin"
    assert export_cli.main(["--target", "jetson-orin", "--out", str(out)]) == 2
    assert error_lines(capsys) == [
        PROG + "onnxruntime-genai is not installed and the LLM is built by onnxruntime-genai's model builder: "
        "pip install 'loc3r[export]' (or pass --llm none to leave the LLM out)"
    ]
    assert no_export == [] and not out.exists()


def test_every_problem_is_reported_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_export: list[str]
) -> None:
    without_genai(monkeypatch)
    out = tmp_path / "a-file"
    out.write_text("mine")
    argv = ["--target", "cpu", "--llm", "fp16", "--context-tokens", "0", "--out", str(out)]
    assert export_cli.main(argv) == 2
    lines = error_lines(capsys)
    assert len(lines) == 4 and all(line.startswith(PROG) for line in lines), lines
    assert f"--out {out} is a file, not a folder" in lines[0]
    assert "--context-tokens 0 must be positive" in lines[1]
    assert "onnxruntime-genai is not installed" in lines[2]
    assert "--llm fp16 has no CPU form" in lines[3] and "use --llm fp32" in lines[3]
    assert no_export == [] and out.read_text() == "mine"


def test_an_unknown_target_and_model_are_both_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_export: list[str]) -> None:
    assert export_cli.main(["--target", "orin-mega", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 2
    assert "unknown target 'orin-mega'" in lines[0] and "jetson-orin-agx" in lines[0]
    assert str(tmp_path / "nope") in lines[1]
    assert no_export == []


def test_a_disk_too_small_is_refused_before_any_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_export: list[str]
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    assert export_cli.main(["--target", "cpu", "--llm", "none", "--out", str(tmp_path / "cpu")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(PROG + f"--out {tmp_path / 'cpu'}: the export writes about ")
    assert "but 0.00 GiB is free" in line and line.endswith("free some space, or pass --out on another disk")
    assert no_export == []


def test_disk_need_counts_the_graphs_fp16_copies() -> None:
    from loc3r.export.memory_plan import Weights

    weights = {"vision": Weights(1000, 500), "llm decoder": Weights(400, 400)}
    assert preflight.disk_need(weights, fp16=False) == int(1400 * preflight.DISK_MARGIN)
    assert preflight.disk_need(weights, fp16=True) == int(1900 * preflight.DISK_MARGIN)
    assert shutil.disk_usage(".").free > 0


def test_a_passing_export_says_what_it_checked_per_graph_and_the_next_step(cpu_export: Path) -> None:
    """The shared cpu export (tiny, fp32 LLM): what it printed while working and at the end."""
    progress = (cpu_export.parent / "stderr.txt").read_text().splitlines()
    out = (cpu_export.parent / "stdout.txt").read_text().splitlines()
    assert progress[0] == "loading model tiny and checking what the export needs ..."
    assert progress[1].startswith("checked: target cpu, LLM fp32: memory plan ")
    assert progress[2].startswith("[1/4] exporting cut3r: encoder + recurrent step, ONNX Runtime vs PyTorch over 8 frames at 16:9")
    assert any(line.strip().startswith("cut3r_step.onnx: max abs ") for line in progress)
    assert progress[-1].startswith("[4/4] exporting the LLM (fp32, cpu form) with onnxruntime-genai's builder, then a 16-token probe")
    graph_lines = [line for line in out if "parity vs PyTorch" in line]
    assert len(graph_lines) == 6 and all(line.endswith(": pass") for line in graph_lines), graph_lines
    assert "tolerance atol " in graph_lines[0] and "tolerance 0.0001 (fp32 form): pass" in graph_lines[-1]
    assert out[-1] == f"next: loc3r-run VIDEO QUESTION --model tiny --backend onnxruntime --engines {cpu_export}"


def test_the_llm_parity_line_shows_its_tolerance_and_verdict() -> None:
    exact = {"max_abs_logits": 3e-5, "max_abs_hidden": 2e-4, "top1_match": True, "tolerance_fp32": 1e-4, "exact_form": True}
    assert llm_parity_line(exact) == "parity vs PyTorch: max abs logits 3.00e-05, hidden 2.00e-04, tolerance 0.0001 (fp32 form): FAIL"
    assert llm_parity_line(exact | {"max_abs_hidden": 5e-5}).endswith("tolerance 0.0001 (fp32 form): pass")
    quantized = exact | {"max_abs_hidden": 0.437, "exact_form": False}
    assert llm_parity_line(quantized).endswith("hidden 4.37e-01 (quantized: no elementwise tolerance), same top-1 token")
    assert llm_parity_line(quantized | {"top1_match": False}).endswith("top-1 token differs (reported, not a gate: quantization can flip near-tied logits, as random weights' are)")
    assert llm_parity_line({"skipped": "too big"}) == "parity vs PyTorch skipped: too big"


def test_help_lists_the_targets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        export_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "target profile: cpu, jetson-orin-agx," in text and "jetson-orin (= jetson-orin-agx)" in text
    assert "engines/*.toml" not in text


# -- the LLM builder's Python: GPU installs and Python 3.10 ------------------------------------


def test_python_3_10_is_refused_with_the_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_export: list[str]) -> None:
    from loc3r.export import llm

    monkeypatch.setattr(llm, "builder_facts", lambda python=None: llm.BuilderFacts((3, 10), True, None, True))
    assert export_cli.main(["--target", "jetson-orin", "--out", str(tmp_path / "orin")]) == 2
    assert error_lines(capsys) == [
        PROG + "onnxruntime-genai 0.18 (the LLM builder) has no wheel for Python 3.10 (this Python): export on Python >= 3.11 (any machine, "
        "no GPU needed) and copy the folder, or build it in a venv of its own: python3.11 -m venv .venv-builder && .venv-builder/bin/pip install "
        "-e '.[cpu,export]', then pass --builder-python .venv-builder/bin/python (or --llm none to leave the LLM out)"
    ]
    assert no_export == []


def test_a_gpu_install_without_the_builder_is_given_both_routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_export: list[str]) -> None:
    monkeypatch.setattr("loc3r.runtime.ort.distribution", lambda name: {"onnxruntime-gpu": "1.31.1"}.get(name))
    assert export_cli.main(["--target", "x86-cuda", "--out", str(tmp_path / "x86")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(PROG + "onnxruntime-genai is not installed, and beside onnxruntime-gpu it cannot be (it requires the CPU onnxruntime): ")
    assert "pip install 'loc3r[export-cuda]'" in line and "--builder-python .venv-builder/bin/python" in line


def test_a_builder_python_that_cannot_build_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_export: list[str]) -> None:
    missing = tmp_path / "nope" / "python"
    assert export_cli.main(["--target", "cpu", "--out", str(tmp_path / "cpu"), "--builder-python", str(missing)]) == 2
    assert error_lines(capsys) == [
        PROG + f"--builder-python {missing} does not run (No such file or directory): pass a venv's python: "
        "python3 -m venv .venv-builder && .venv-builder/bin/pip install -e '.[cpu,export]'"
    ]


def test_the_builder_runs_in_the_python_given(trained_llm: torch.nn.Module, tmp_path: Path) -> None:
    """--builder-python: the builder's process is that Python's (here a wrapper that logs and
    runs this venv's Python), and the manifest names the builder it found there."""
    from loc3r.export.llm import LLMForm, LLMSource, export_llm

    log = tmp_path / "calls.log"
    wrapper = tmp_path / "builder-python"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    source = LLMSource.from_model(trained_llm, tmp_path / "source")
    fragment = export_llm(source, tmp_path / "llm", LLMForm("cpu", "fp32", "fp32"), 64, 16, builder_python=str(wrapper))
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-c ") and [c for c in calls if c.startswith("-m ")] == [calls[-1]]  # the probe, then the build
    assert calls[-1].startswith("-m loc3r.export.llm_build ")
    assert fragment["builder"]["package"] == "onnxruntime-genai" and fragment["builder"]["version"] == importlib.metadata.version("onnxruntime-genai")
    assert (tmp_path / "llm" / "decoder.onnx").is_file()
