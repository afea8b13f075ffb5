"""The install check: each known-bad combination fails it (resolutions fed as fixtures), the
documented blocks are what it resolves, and, where the index can be reached, the real
resolver passes every documented route."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from loc3r.engines import resolve
from loc3r.engines.install_rules import CudaNeed, check, cuda_need, no_wheel
from loc3r.engines.resolve import ROUTES, check_route, doc_blocks, parse_install
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
JETSON, X86_12, X86_13 = ROUTES["jetpack6"], ROUTES["x86-cuda12"], ROUTES["x86-cuda13"]
GOOD_JETSON = {"numpy": "1.26.4", "cuda-python": "12.6.2.post1", "onnxruntime-gpu": "1.23.0", "onnx": "1.23.2"}
GOOD_X86_13 = {"numpy": "2.5.5", "cuda-python": "13.4.4", "cuda-bindings": "13.4.4", "onnxruntime-gpu": "1.31.1", "tensorrt-cu13": "10.16.1.11"}


def rules(resolution: dict[str, str], platform=JETSON) -> list[str]:  # type: ignore[no-untyped-def]
    return [v.rule for v in check(resolution, platform, "1.23")]


def test_the_good_resolutions_pass() -> None:
    assert rules(GOOD_JETSON) == []
    assert rules(GOOD_X86_13, X86_13) == []
    assert rules({**GOOD_X86_13, "onnxruntime-gpu": "1.26.0", "cuda-python": "12.9.10", "cuda-bindings": "12.9.10", "tensorrt-cu13": "10.16.1.11"}, X86_12) == ["cuda-driver"]


@pytest.mark.parametrize("package, version", [("cuda-python", "12.9.3"), ("cuda-bindings", "12.9.10"), ("cuda-python", "13.0.0")])
def test_cuda_python_newer_than_jetpack6s_driver_fails(package: str, version: str) -> None:
    (violation,) = check({**GOOD_JETSON, package: version}, JETSON, "1.23")
    assert violation.rule == "cuda-driver"
    assert "JetPack" not in violation.problem and "jetpack6's driver is CUDA 12.6 and a Jetson has no CUDA minor-version compatibility" in violation.problem
    assert violation.fix == "install with -c engines/constraints/jetpack6.txt (it pins cuda-python to the device's CUDA)"


def test_cuda_python_before_12_9_3_loads_the_systems_runtime() -> None:
    assert rules({**GOOD_JETSON, "cuda-python": "12.9.2"}) == []
    assert cuda_need("cuda-python", Version("12.9.2")) is None
    assert cuda_need("cuda-bindings", Version("12.9.3")) == CudaNeed((12, 9), "cuda-bindings", "cuda-bindings 12.9.3 links the CUDA 12.9 runtime statically (from 12.9.3)")


def test_cuda13_libraries_on_the_cuda12_route_fail() -> None:
    for extra in ({"onnxruntime-gpu": "1.27.0"}, {"tensorrt-cu13": "10.16.1.11"}, {"nvidia-cuda-runtime": "13.5.37"}):
        base = {"numpy": "2.2.6", "cuda-python": "12.9.10", "cuda-bindings": "12.9.10", "onnxruntime-gpu": "1.26.0"}
        assert rules({**base, **extra}, X86_12) == ["cuda-driver"], extra


def test_numpy_2_with_the_jetson_ort_wheel_fails() -> None:
    (violation,) = check({**GOOD_JETSON, "numpy": "2.2.6"}, JETSON, "1.23")
    assert violation.rule == "numpy-2-jetson-ort" and violation.problem.startswith("numpy 2.2.6 with the jetson-ai-lab onnxruntime-gpu")
    assert rules({**GOOD_X86_13, "numpy": "2.2.6"}, X86_13) == []  # PyPI's wheels are built for numpy 2


@pytest.mark.parametrize("package", ["onnxruntime", "onnxruntime-gpu"])
def test_onnxruntime_older_than_the_graphs_need_fails(package: str) -> None:
    resolution = {k: v for k, v in GOOD_JETSON.items() if k != "onnxruntime-gpu"} | {package: "1.22.0"}
    (violation,) = check(resolution, JETSON, "1.23")
    assert violation.rule == "onnxruntime-minimum" and violation.problem.startswith(f"{package} 1.22.0 is older than 1.23")


def test_two_onnxruntime_builds_fail() -> None:
    (violation,) = check({**GOOD_X86_13, "onnxruntime": "1.32.0", "onnxruntime-genai": "0.18.0"}, X86_13, "1.23")
    assert violation.rule == "two-onnxruntime-builds"
    assert violation.problem == "onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 together (onnxruntime-genai requires the CPU build): they overwrite each other's files"
    assert "--builder-python" in violation.fix


def test_no_wheel_for_the_python_fails() -> None:
    error = (
        "error: No solution found when resolving dependencies\n  cause: Because onnxruntime-genai==0.18.0 has no wheels with a matching "
        "Python implementation tag (e.g., `cp310`) and only onnxruntime-genai<=0.18.0 is available, ..."
    )
    violation = no_wheel(error, JETSON)
    assert violation is not None and violation.problem == "onnxruntime-genai 0.18.0 has no wheel for Python 3.10 (jetpack6)"
    assert violation.fix.startswith("export on Python >= 3.11")
    assert no_wheel("error: something else", JETSON) is None


def test_the_guide_has_a_block_for_every_route() -> None:
    blocks = doc_blocks((REPO / "docs" / "user-guide.md").read_text(encoding="utf-8"))
    assert set(blocks) == set(ROUTES)
    jetson = parse_install(blocks["jetpack6"], REPO)
    assert jetson.editables == [f"{REPO}[jetson]"] and jetson.constraints == [REPO / "engines/constraints/jetpack6.txt"] * 2
    assert jetson.indexed == {"https://pypi.jetson-ai-lab.io/jp6/cu126": ["onnxruntime-gpu>=1.23,<1.24"]}
    for route, lines in blocks.items():
        for constraint in parse_install(lines, REPO).constraints:
            assert constraint.is_file() and constraint.name == f"{route}.txt"


class FakeUv:
    """``uv pip compile`` answering a fixed output; records the command line."""

    def __init__(self, stdout: str = "", stderr: str = "", code: int = 0) -> None:
        self.stdout, self.stderr, self.code = stdout, stderr, code
        self.args: list[str] = []
        self.inputs: dict[str, str] = {}

    def __call__(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        self.args = args
        for flag in ("compile", "--override"):
            self.inputs[flag] = Path(args[args.index(flag) + 1]).read_text()
        return subprocess.CompletedProcess(args, self.code, self.stdout, self.stderr)


def jetson_commands() -> list[str]:
    return doc_blocks((REPO / "docs" / "user-guide.md").read_text(encoding="utf-8"))["jetpack6"]


def offline_jetson_index(url: str) -> str | None:
    return "Name or service not known" if "jetson-ai-lab" in url else None


def test_a_route_resolved_with_a_known_bad_result_fails() -> None:
    uv = FakeUv("cuda-python==12.9.10\ncuda-bindings==12.9.10\nnumpy==2.2.6\n")
    outcome = check_route("jetpack6", jetson_commands(), REPO, uv, "uv", offline_jetson_index)
    assert [v.rule for v in outcome.violations] == ["cuda-driver", "numpy-2-jetson-ort"]
    assert uv.args[uv.args.index("--python-platform") + 1] == "aarch64-unknown-linux-gnu" and uv.args[uv.args.index("--python-version") + 1] == "3.10"
    assert uv.inputs["compile"] == f"-e {REPO}[jetson]\n"  # the unreachable index's wheel is modelled, not resolved
    assert "torch ; " in uv.inputs["--override"] and "onnxruntime-gpu ; " in uv.inputs["--override"]
    assert "not resolved here: onnxruntime-gpu>=1.23,<1.24 from https://pypi.jetson-ai-lab.io/jp6/cu126 (Name or service not known); checked as 1.23" in outcome.lines
    assert resolve.render(outcome).splitlines()[0] == "jetpack6 (aarch64-unknown-linux-gnu, Python 3.10, driver CUDA 12.6): FAIL"


def test_a_route_without_a_wheel_for_its_python_fails() -> None:
    uv = FakeUv(stderr="error: ... Because onnxruntime-genai==0.18.0 has no wheels with a matching Python implementation tag (e.g., `cp310`) ...", code=1)
    outcome = check_route("jetpack6", jetson_commands(), REPO, uv, "uv", offline_jetson_index)
    assert [v.rule for v in outcome.violations] == ["no-wheel"]


def test_without_uv_or_the_index_the_check_is_skipped_with_the_reason() -> None:
    outcome = check_route("jetpack6", jetson_commands(), REPO, FakeUv(), "uv", lambda url: "Name or service not known")
    assert outcome.skipped == "the package index cannot be reached (Name or service not known)"
    assert resolve.render(outcome).endswith("skipped: the package index cannot be reached (Name or service not known)")
    uv = FakeUv(stderr="error: Failed to fetch: `https://pypi.org/simple/numpy/`\n  Caused by: dns error", code=2)
    assert check_route("x86-cuda13", ["pip install numpy"], REPO, uv, "uv", lambda url: None).skipped.startswith("the resolver could not reach the index")


def test_bad_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "guide.md"
    doc.write_text("# nothing\n")
    assert resolve.main(["jetpack6", "--doc", str(doc)]) == 2
    assert capsys.readouterr().err.strip() == f"python -m loc3r.engines.resolve: error: {doc} has no install block for jetpack6: mark it with <!-- install: ROUTE --> before its fenced block"


def test_the_documented_routes_resolve_without_a_known_bad_combination(capsys: pytest.CaptureFixture[str]) -> None:
    """The real resolver (uv) over every documented block, for its platform and Python."""
    if resolve.find_uv() is None:
        pytest.skip("uv is not installed (pip install uv)")
    if (why := resolve.reachable(resolve.PYPI)) is not None:
        pytest.skip(f"the package index cannot be reached ({why})")
    code = resolve.main(["all"])
    text = capsys.readouterr().out
    assert code == 0, text
    for route in ROUTES:
        assert f"{route} (" in text
    assert "skipped" not in text, text
    assert "cuda-python 12.6.2.post1" in text and "numpy 1.26" in text  # the Jetson route's pins took effect
