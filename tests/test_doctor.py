"""loc3r-doctor: one screen, every missing or conflicting piece named with its fix, and whether
this device can run an export; the GPU pieces are the fakes of ``gpu_fakes``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gpu_fakes import FakeCudart, FakeGpuOnnxRuntime, FakeTensorRT, install_cudart

from loc3r.errors import InputError
from loc3r.export.tensorrt_build import engine_file_name
from loc3r.runtime import cuda, doctor, ort

GRAPHS = ("cut3r_encoder", "cut3r_step", "vision", "pose_head", "bev_head")


def report(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = doctor.main(list(argv))
    return code, capsys.readouterr().out


def lines(text: str) -> dict[str, str]:
    """label -> value of the report's finding lines."""
    found = {}
    for line in text.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("  - ") and not line.startswith("    fix"):
            label, _, value = line.strip().partition("  ")
            found[label] = value.strip()
    return found


def on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, sm: tuple[int, int] = (8, 7), trt: str | None = "10.3.0.30", driver: tuple[int, int] = (12, 6), packages: dict[str, str] | None = None
) -> FakeCudart:
    cudart = install_cudart(monkeypatch, FakeCudart(sm=sm))
    packages = packages or {"cuda-python": "12.6.0"}
    monkeypatch.setattr(doctor, "distribution", packages.get)
    monkeypatch.setattr(doctor, "installed", lambda: dict(packages))
    monkeypatch.setattr(cuda, "driver_cuda_version", lambda: driver)
    monkeypatch.setattr(doctor, "measure_runtime_overhead", lambda: 600 << 20)
    if trt:
        monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(trt, cudart))
    return cudart


def on_a_jetson(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, system_site_packages: bool) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024\n")
    monkeypatch.setattr(doctor, "TEGRA_RELEASE", release)
    monkeypatch.setattr(doctor, "system_site_packages", lambda: system_site_packages)


def with_engines(export: Path, tmp_path: Path, trt: str = "10.3.0.30", sm: str = "87") -> Path:
    out = Path(shutil.copytree(export, tmp_path / "orin"))
    data = json.loads((out / "manifest.json").read_text())
    data["engines"] = {"trt_version": trt, "sm": sm, "files": {n: engine_file_name(n, trt, sm) for n in GRAPHS}}
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def test_this_cpu_machine_has_no_problem(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = report(capsys)
    found = lines(text)
    assert code == 0 and text.splitlines()[0] == "loc3r-doctor: this machine, for loc3r" and "no problems found" in text
    assert set(found) == {"platform", "python", "torch", "onnxruntime", "tensorrt", "CUDA driver", "cuda-python", "GPU", "export extra", "serve extra"}
    assert found["CUDA driver"] == "none"  # no libcuda here, and no CUDA library installed
    assert found["torch"].startswith(f"{torch.__version__}, CUDA: no (the onnxruntime and tensorrt backends do not need it)")
    assert "providers: " in found["onnxruntime"] and "CPU" in found["onnxruntime"]
    assert found["tensorrt"] == "not installed (needed only on a GPU device)"


def test_a_jetson_venv_that_hides_jetpack_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    on_a_jetson(monkeypatch, tmp_path, system_site_packages=False)
    code, text = report(capsys)
    assert code == 1 and lines(text)["platform"].startswith("Jetson, L4T R36.4.0")
    assert "- python: this venv hides JetPack's TensorRT (it lives in the system Python)" in text
    assert "fix: recreate it: python3 -m venv --system-site-packages .venv && .venv/bin/pip install -e '.[jetson]'" in text
    assert "- GPU: no CUDA GPU is visible" in text and "fix: pip install -e '.[jetson]'" in text


def test_both_onnxruntime_builds(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    versions = {"onnxruntime": "1.20.1", "onnxruntime-gpu": "1.20.1"}
    monkeypatch.setattr(doctor, "distribution", versions.get)
    code, text = report(capsys)
    assert code == 1 and lines(text)["onnxruntime"] == "onnxruntime 1.20.1 AND onnxruntime-gpu 1.20.1   <- problem"
    assert "- onnxruntime: both builds are installed: they overwrite each other's files" in text
    assert "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install -e '.[gpu]'" in text
    monkeypatch.setattr(ort, "distribution", versions.get)  # and the runtime refuses to start
    with pytest.raises(InputError, match="both onnxruntime and onnxruntime-gpu are installed"):
        ort.import_onnxruntime()


def test_a_gpu_machine_with_everything_can_run_the_built_export(
    jetson_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    on_a_gpu(monkeypatch)
    FakeGpuOnnxRuntime().install(monkeypatch)
    code, text = report(capsys, "--engines", str(with_engines(jetson_export, tmp_path)))
    found = lines(text)
    assert code == 0, text
    assert found["GPU"] == "Orin (sm_87), 64.0 GiB, 48.0 GiB free (via cuda-python)"
    assert found["tensorrt"] == "10.3.0.30" and found["cuda-python"] == "12.6.0"
    assert found["CUDA driver"] == "CUDA 12.6; installed libraries need CUDA 12.6 (cuda-python)"
    assert found["TensorRT EP"] == "libnvinfer loads: --backend onnxruntime can use it"
    assert found["GPU overhead"] == "0.59 GiB measured (a CUDA context + ONNX Runtime's CUDA provider), within the memory plan's 1.0 GiB assumption"
    assert found["onnxruntime"].endswith("providers: Tensorrt, CUDA, CPU")
    assert found["tensorrt"] and "engines for TensorRT 10.3.0.30 / sm_87: usable here" in text
    assert "GPU providers present: --backend onnxruntime can run it" in text


@pytest.mark.parametrize(
    "setup, problem, fix",
    [
        ("no-gpu-onnxruntime", "onnxruntime: a GPU is here but ONNX Runtime has no CUDA provider", "pip uninstall -y onnxruntime && pip install -e '.[gpu]'"),
        ("no-tensorrt", "tensorrt: no TensorRT: --backend tensorrt and loc3r-export build cannot run here", "pip install -e '.[tensorrt]'"),
        ("other-gpu", "tensorrt backend: this device has TensorRT 10.3.0.30 / sm_89", "loc3r-export build --manifest"),
        ("not-built", "tensorrt backend: --backend tensorrt needs them", "loc3r-export build --manifest"),
        ("torch-only", "cuda-python: the tensorrt backend needs cuda-python (it does not use CUDA torch)", "pip install 'cuda-python>=12,<13'"),
    ],
)
def test_each_missing_piece_is_named_with_its_fix(
    setup: str, problem: str, fix: str, jetson_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engines = with_engines(jetson_export, tmp_path)
    if setup == "torch-only":  # a CUDA torch but no cuda-python
        monkeypatch.setitem(sys.modules, "cuda", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="RTX 4090", major=8, minor=9))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (20 << 30, 24 << 30))
        monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.3.0.30"))
    else:
        on_a_gpu(monkeypatch, sm=(8, 9) if setup == "other-gpu" else (8, 7), trt=None if setup == "no-tensorrt" else "10.3.0.30")
    if setup != "no-gpu-onnxruntime":
        FakeGpuOnnxRuntime().install(monkeypatch)
    if setup == "not-built":
        engines = Path(shutil.copytree(jetson_export, tmp_path / "unbuilt"))
    code, text = report(capsys, "--engines", str(engines))
    assert code == 1
    assert f"  - {problem}" in text and f"fix: {fix}" in text


def test_an_unreadable_export_is_a_finding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = report(capsys, "--engines", str(tmp_path))
    assert code == 1 and "- export: " in text and "has no manifest.json" in text


# -- the install: driver against runtime libraries, numpy against ONNX Runtime, TensorRT EP ------


def test_a_cuda_runtime_newer_than_a_jetsons_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    on_a_jetson(monkeypatch, tmp_path, system_site_packages=True)
    cudart = on_a_gpu(monkeypatch, packages={"cuda-python": "12.9.10", "cuda-bindings": "12.9.10"})
    cudart.runtime_version = 12090
    FakeGpuOnnxRuntime().install(monkeypatch)
    code, text = report(capsys)
    assert code == 1 and lines(text)["CUDA driver"] == "CUDA 12.6; installed libraries need CUDA 12.9 (cuda-python)   <- problem"
    assert (
        "- CUDA driver: cuda-python 12.9.10 links the CUDA 12.9 runtime statically (from 12.9.3), newer than the driver's CUDA 12.6 "
        "(a Jetson has no CUDA minor-version compatibility): it fails with cudaErrorInsufficientDriver"
    ) in text
    assert "fix: pip install -e '.[jetson]' -c engines/constraints/jetpack6.txt (cuda-python 12.6, numpy<2)" in text


def test_cuda13_libraries_on_a_cuda12_driver(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    on_a_gpu(monkeypatch, sm=(8, 9), driver=(12, 4), packages={"cuda-python": "12.9.10", "cuda-bindings": "12.9.10", "onnxruntime-gpu": "1.31.1", "nvidia-cuda-runtime": "13.5.37"})
    FakeGpuOnnxRuntime().install(monkeypatch)
    code, text = report(capsys)
    assert code == 1 and lines(text)["CUDA driver"].startswith("CUDA 12.4; installed libraries need CUDA 13.5 (nvidia-cuda-runtime)")
    assert "- CUDA driver: nvidia-cuda-runtime 13.5.37 is the CUDA 13.5 runtime, newer than the driver's CUDA 12.4: it fails with cudaErrorInsufficientDriver" in text
    assert "fix: update the NVIDIA driver to >= 580.65.06, or install the x86-cuda12 route (docs/user-guide.md, -c engines/constraints/x86-cuda12.txt)" in text


def test_cuda_12_9_libraries_on_an_x86_cuda_12_4_driver_are_fine(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """x86 drivers run any runtime of their major version (minor-version compatibility)."""
    on_a_gpu(monkeypatch, sm=(8, 9), driver=(12, 4), packages={"cuda-python": "12.9.10", "cuda-bindings": "12.9.10", "onnxruntime-gpu": "1.26.0"})
    FakeGpuOnnxRuntime().install(monkeypatch)
    code, text = report(capsys)
    assert lines(text)["CUDA driver"] == "CUDA 12.4; installed libraries need CUDA 12.9 (cuda-python)" and "- CUDA driver" not in text


def test_numpy_2_with_an_onnxruntime_built_for_numpy_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy

    on_a_jetson(monkeypatch, tmp_path, system_site_packages=True)
    on_a_gpu(monkeypatch, packages={"cuda-python": "12.6.0", "onnxruntime-gpu": "1.23.0", "numpy": "2.2.6"})
    monkeypatch.setattr(numpy, "__version__", "2.2.6")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails, as the numpy-1.x build does under numpy 2
    code, text = report(capsys)
    assert code == 1 and lines(text)["onnxruntime"] == "onnxruntime-gpu 1.23.0 installed, does not import   <- problem"
    assert "- onnxruntime: this onnxruntime-gpu was built for numpy 1.x and numpy 2.2.6 is installed" in text
    assert "fix: pip install 'numpy<2' -c engines/constraints/jetpack6.txt" in text


def test_an_onnxruntime_older_than_the_llm_decoder_needs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.22.0")
    code, text = report(capsys)
    assert code == 1 and "- onnxruntime: older than 1.23, which loc3r's LLM decoder needs (opset 22, GroupQueryAttention with 12 inputs)" in text
    assert "fix: pip install 'onnxruntime>=1.23'" in text


def test_a_listed_but_unloadable_tensorrt_provider(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    on_a_gpu(monkeypatch, sm=(8, 9), driver=(13, 0), packages={"cuda-python": "13.4.4", "onnxruntime-gpu": "1.31.1"})
    FakeGpuOnnxRuntime(nvinfer_missing="libnvinfer.so.10 does not load (cannot open shared object file)").install(monkeypatch)
    code, text = report(capsys)
    assert code == 1 and lines(text)["TensorRT EP"] == "listed, but does not load   <- problem"
    assert "- TensorRT EP: libnvinfer.so.10 does not load (cannot open shared object file): --backend onnxruntime runs on the CUDA provider only" in text
    assert "fix: pip install tensorrt-cu13-libs (the CUDA build of onnxruntime-gpu), or add TensorRT's lib folder to LD_LIBRARY_PATH" in text


def test_the_library_probe_on_this_machine() -> None:
    """No TensorRT here: the real probe says so instead of raising."""
    assert ort.nvinfer_error().startswith("libnvinfer.so.10 does not load (")
    assert cuda.driver_cuda_version() is None


def test_the_export_and_serve_extras_are_checked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    code, text = report(capsys)
    assert code == 0 and lines(text)["export extra"].startswith("onnxruntime-genai 0.18.")
    assert lines(text)["serve extra"].startswith("installed (fastapi, uvicorn")

    real = importlib.util.find_spec
    hidden = {"onnxruntime_genai", "fastapi"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    code, text = report(capsys)
    found = lines(text)
    assert code == 0 and found["export extra"] == "not installed (loc3r-export's LLM needs it: pip install -e '.[export]')"
    assert found["serve extra"] == "not installed: fastapi (loc3r-serve needs them: pip install -e '.[serve]')"
    assert text.splitlines()[-1] == "no problems found (optional extras not installed: export, serve)"

    hidden.clear()
    monkeypatch.setattr(doctor, "distribution", lambda name: "0.19.1" if name == "onnxruntime-genai" else ort.distribution(name))
    code, text = report(capsys)
    assert code == 1 and "export extra: loc3r's LLM builder is written for onnxruntime-genai 0.18.x" in text


def test_a_runtime_overhead_above_the_plans_assumption(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    on_a_gpu(monkeypatch)
    monkeypatch.setattr(doctor, "measure_runtime_overhead", lambda: 1536 << 20)
    FakeGpuOnnxRuntime().install(monkeypatch)
    code, text = report(capsys)
    assert code == 1 and lines(text)["GPU overhead"].startswith("1.50 GiB measured (a CUDA context + ONNX Runtime's CUDA provider), above the memory plan's 1.0 GiB")
    assert "- GPU overhead: exports' memory plans assume less runtime overhead than this device takes" in text
