"""The GPU verification script on a machine without a GPU: every GPU row says why it is
skipped, the CPU rows run, and a check that breaks is a FAIL row, never a crash."""

from __future__ import annotations

import subprocess
from pathlib import Path

from loc3r.bench import gpu_verify
from loc3r.bench.gpu_verify import CHECKS, Context, Row, run_checks, table

REPO = Path(__file__).resolve().parents[1]
NO_CUDA_PYTHON = "cuda-python is not installed, so the TensorRT path cannot reach the GPU"


def test_without_a_gpu_every_gpu_row_is_skipped_with_the_reason(tmp_path: Path) -> None:
    gpu_only = [check for check in CHECKS if check[1] is not gpu_verify.check_backends]
    rows = run_checks(Context(tmp_path), gpu_only)
    assert [(r.check, r.status, r.detail) for r in rows] == [(name, "skipped", NO_CUDA_PYTHON) for name, _ in gpu_only]


def test_a_check_that_breaks_is_a_fail_row(tmp_path: Path) -> None:
    def broken(ctx: Context) -> list[Row]:
        raise ValueError("engine output has NaN")

    (row,) = run_checks(Context(tmp_path), [("a check", broken)])
    assert row.check == "a check" and row.status == "FAIL" and row.detail.startswith("ValueError: engine output has NaN (test_gpu_verify.py:")


def test_the_table_aligns_its_columns() -> None:
    text = table([Row("short", "ok", "a"), Row("a longer check", "skipped", "why")])
    assert text.splitlines() == [
        "check           status   detail",
        "--------------  -------  ------",
        "short           ok       a",
        "a longer check  skipped  why",
    ]


def test_the_script_runs_here_and_prints_one_table() -> None:
    """The torch rows run on the CPU; the GPU rows are skipped; exit 0."""
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_verify.sh")], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["check", "status", "detail"] and lines[-1].startswith("(tiny random weights")
    rows = {line[:52].strip(): line[52:].split(None, 1) for line in lines[2:-1]}
    assert rows["loc3r-run --backend torch 16:9"][0] == "ok" and rows["loc3r-run --backend torch 9:16"][0] == "ok"
    for name in ("loc3r-run --backend onnxruntime 16:9", "loc3r-run --backend tensorrt 9:16", "engine builds (strongly typed, pinned)"):
        assert rows[name] == ["skipped", NO_CUDA_PYTHON]
    assert "FAIL" not in done.stdout
