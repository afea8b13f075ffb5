"""What a fresh ``loc3r-run`` process imports: the exported-graph path runs on tokenizers,
numpy, ONNX Runtime and PyAV alone (no torch, no transformers), ``--help`` loads nothing
heavy, and bad input is refused before torch or any model loads (issue 28, item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loc3r.runtime.demo_video import write_demo_video

PROBE = Path(__file__).with_name("module_probe.py")
HEAVY = ("torch", "transformers")


def run_probed(tmp_path: Path, target: str, *argv: object) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``target`` (module:function) with ``argv`` in a fresh interpreter; its result and
    the modules it imported."""
    out = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.txt"
    done = subprocess.run(
        [sys.executable, str(PROBE), str(out), target, *map(str, argv)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return done, set(out.read_text(encoding="utf-8").split())


def one_error_line(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("loc3r-run: error: ")]
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("v") / "v.mp4", num_frames=12, width=160, height=120)


def test_onnxruntime_run_imports_neither_torch_nor_transformers(cpu_export: Path, video: Path, tmp_path: Path) -> None:
    """The first run of an export reads each graph's structure once with onnx (its external
    data must lie in listed files) and remembers the verdict; later runs need no onnx either."""
    argv = (video, "Where am I?", "--backend", "onnxruntime", "--engines", cpu_export, "--frames", "3", "--max-new-tokens", "2", "--no-cache")
    for run in ("first", "later"):
        done, modules = run_probed(tmp_path, "loc3r.runtime.cli:main", *argv)
        assert done.returncode == 0, done.stderr
        assert "position: x = " in done.stdout
        assert {"onnxruntime", "tokenizers", "numpy", "av"} <= modules  # the run really went through them
        assert not modules & set(HEAVY), (run, sorted(modules & set(HEAVY)))
    assert "onnx" not in modules


def test_torch_backend_still_runs_torch(video: Path, tmp_path: Path) -> None:
    """The probe sees torch when a run uses it (so the test above can fail)."""
    done, modules = run_probed(tmp_path, "loc3r.runtime.cli:main", video, "Where?", "--frames", "2", "--max-new-tokens", "1", "--no-cache")
    assert done.returncode == 0, done.stderr
    assert "torch" in modules


@pytest.mark.parametrize("target", ["loc3r.runtime.cli:main", "loc3r.models.convert_cli:main"])
def test_help_loads_nothing_heavy(target: str, tmp_path: Path) -> None:
    done, modules = run_probed(tmp_path, target, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout
    assert not modules & {*HEAVY, "onnxruntime", "onnx"}, sorted(modules & {*HEAVY, "onnxruntime", "onnx"})


def _still_image(folder: Path) -> Path:
    from PIL import Image

    path = folder / "photo.mp4"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(path, format="PNG")
    return path


def _not_a_bundle(folder: Path) -> Path:
    (folder / "weights").mkdir()
    return folder / "weights"


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (lambda d, v: [d / "missing.mp4", "Where?"], ["missing.mp4: no such file"]),
        (lambda d, v: [_still_image(d), "Where?"], ["is a still image", "pass a video file"]),
        (lambda d, v: [v, "Where?", "--model", _not_a_bundle(d)], ["is not a loc3r bundle (no config.json)", "--model tiny"]),
        (lambda d, v: [v, "Where?", "--backend", "onnxruntime"], ["--backend onnxruntime needs --engines DIR"]),
        (lambda d, v: [v, "Where?", "--backend", "onnxruntime", "--engines", d], ["has no manifest.json"]),
    ],
    ids=["missing-video", "still-image", "bad-model", "onnxruntime-without-engines", "engines-not-an-export"],
)
def test_bad_input_is_refused_before_torch_or_the_model_loads(arguments, fragments: list[str], video: Path, tmp_path: Path) -> None:
    done, modules = run_probed(tmp_path, "loc3r.runtime.cli:main", *arguments(tmp_path, video), "--no-cache")
    one_error_line(done, *fragments)
    assert not modules & {*HEAVY, "onnxruntime"}, sorted(modules & {*HEAVY, "onnxruntime"})


def test_the_tensorrt_backend_module_needs_no_torch() -> None:
    """The TensorRT path (run on a device only) imports neither torch nor transformers either."""
    code = "import sys, loc3r.runtime.tensorrt_backend, loc3r.runtime.pipeline; print(sorted({'torch', 'transformers', 'onnx'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
