"""Known-bad install combinations, each with its fix: one source for the resolver check
(``python -m loc3r.engines.resolve``, over what pip would install on a platform) and for
``loc3r-doctor`` (over what is installed on the machine it runs on).

The facts behind the rules (none measured on a GPU here: unverified on hardware):
- cuda-python / cuda-bindings from 12.9.3 link the CUDA 12.9 runtime statically; 13.x need a
  CUDA 13 driver. JetPack 6's driver is CUDA 12.6 and a Jetson has no CUDA minor-version
  compatibility, so a newer runtime fails with cudaErrorInsufficientDriver (reported on AGX
  Orin, JetPack 6.1, for ``cudaFree(0)``). x86 drivers run any runtime of their major version
  (minor-version compatibility); CUDA 13 needs driver >= 580.
- onnxruntime-gpu on PyPI is built for CUDA 12 up to 1.26 and CUDA 13 from 1.27 (its
  ``[cuda]`` extra pulls the cu13 libraries); tensorrt-cu13 / nvidia-*-cu13 likewise.
- The jetson-ai-lab onnxruntime-gpu wheels for JetPack 6 are built against numpy 1.x:
  ``import onnxruntime`` fails under numpy 2.
- onnxruntime and onnxruntime-gpu overwrite each other's files.
- The minimum ONNX Runtime per graph is in :mod:`loc3r.export.runtime_versions`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

#: CUDA major -> the oldest Linux driver that runs it (NVIDIA's CUDA compatibility tables)
DRIVER_FOR_CUDA = {12: "525.60.13", 13: "580.65.06"}
CONSTRAINTS = "engines/constraints"


@dataclass(frozen=True)
class Platform:
    """An install target as the rules see it."""

    name: str
    python_platform: str  # uv's --python-platform
    python: str  # the Python the device runs
    driver_cuda: tuple[int, int] | None  # the CUDA version of the device's driver, where fixed
    minor_compat: bool  # CUDA minor-version compatibility (no on a Jetson)
    jetson_ort: bool  # onnxruntime-gpu from the jetson-ai-lab index (built for numpy 1.x)


@dataclass(frozen=True)
class CudaNeed:
    """The CUDA driver a package needs: at least ``version``, for ``why``."""

    version: tuple[int, int]
    package: str
    why: str


@dataclass(frozen=True)
class Violation:
    """A known-bad combination found: the rule's name, what fails, and the fix."""

    rule: str
    problem: str
    fix: str


def version_of(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def normalize(resolution: Mapping[str, str]) -> dict[str, Version]:
    """``name -> version`` with canonical names and parsed versions (unparsable dropped)."""
    parsed = {canonicalize_name(name): version_of(version) for name, version in resolution.items()}
    return {name: version for name, version in parsed.items() if version is not None}


_CU_SUFFIX = re.compile(r"^(?:nvidia-.*|tensorrt(?:-.*)?)-cu(1[0-9])(?:-.*)?$")
_CUDA13_UNSUFFIXED = re.compile(r"^nvidia-cuda-(?:runtime|nvrtc)$")


def cuda_need(name: str, version: Version) -> CudaNeed | None:
    """The CUDA driver version a package needs, or None when it needs none of its own."""
    name = canonicalize_name(name)
    if name in ("cuda-python", "cuda-bindings"):
        if version.major >= 13:
            return CudaNeed((version.major, 0), name, f"{name} {version} is built for CUDA {version.major}")
        if version >= Version("12.9.3"):
            return CudaNeed((12, 9), name, f"{name} {version} links the CUDA 12.9 runtime statically (from 12.9.3)")
        return None  # loads the system's libcudart
    if name == "onnxruntime-gpu":
        major = 13 if version >= Version("1.27") else 12
        return CudaNeed((major, 0), name, f"PyPI's onnxruntime-gpu {version} is built for CUDA {major}")
    match = _CU_SUFFIX.match(name)
    if match:
        return CudaNeed((int(match.group(1)), 0), name, f"{name} is a CUDA {match.group(1)} build")
    if _CUDA13_UNSUFFIXED.match(name):  # CUDA 13's own wheels dropped the -cu13 suffix
        return CudaNeed((version.major, version.minor), name, f"{name} {version} is the CUDA {version.major}.{version.minor} runtime")
    return None


def cuda_needs(resolution: Mapping[str, Version]) -> list[CudaNeed]:
    """What every package of ``resolution`` needs of the driver, the most demanding first."""
    needs = [need for name, version in resolution.items() if (need := cuda_need(name, version))]
    return sorted(needs, key=lambda n: n.version, reverse=True)


def driver_runs(driver: tuple[int, int], need: tuple[int, int], minor_compat: bool) -> bool:
    """Whether a driver of CUDA ``driver`` runs a runtime needing ``need``."""
    if need[0] != driver[0]:
        return need[0] < driver[0]
    return minor_compat or need <= driver


def fmt(cuda: tuple[int, int]) -> str:
    return f"{cuda[0]}.{cuda[1]}"


# -- the rules --------------------------------------------------------------------------------


def rule_driver(resolution: Mapping[str, Version], platform: Platform, min_ort: Version) -> Violation | None:
    """A package needs a newer CUDA driver than the platform's."""
    if platform.driver_cuda is None:
        return None
    failing = [n for n in cuda_needs(resolution) if not driver_runs(platform.driver_cuda, n.version, platform.minor_compat)]
    if not failing:
        return None
    need = failing[0]
    compat = "" if platform.minor_compat else " and a Jetson has no CUDA minor-version compatibility"
    return Violation(
        "cuda-driver",
        f"{need.why}, but {platform.name}'s driver is CUDA {fmt(platform.driver_cuda)}{compat}: it fails with cudaErrorInsufficientDriver",
        f"install with -c {CONSTRAINTS}/{platform.name}.txt (it pins cuda-python to the device's CUDA)",
    )


def rule_numpy_jetson_ort(resolution: Mapping[str, Version], platform: Platform, min_ort: Version) -> Violation | None:
    """numpy 2 beside the jetson-ai-lab onnxruntime-gpu (built for numpy 1.x)."""
    numpy = resolution.get("numpy")
    if not platform.jetson_ort or numpy is None or numpy.major < 2:
        return None
    return Violation(
        "numpy-2-jetson-ort",
        f"numpy {numpy} with the jetson-ai-lab onnxruntime-gpu, which is built for numpy 1.x: import onnxruntime fails",
        f"install with -c {CONSTRAINTS}/{platform.name}.txt (numpy<2), or: pip install 'numpy<2'",
    )


def rule_ort_minimum(resolution: Mapping[str, Version], platform: Platform, min_ort: Version) -> Violation | None:
    """An ONNX Runtime older than loc3r's graphs need."""
    for name in ("onnxruntime", "onnxruntime-gpu"):
        version = resolution.get(name)
        if version is not None and version < min_ort:
            return Violation(
                "onnxruntime-minimum",
                f"{name} {version} is older than {min_ort}, which loc3r's graphs need (the LLM decoder: opset 22, GroupQueryAttention with 12 inputs)",
                f"pip install '{name}>={min_ort}' (with -c {CONSTRAINTS}/{platform.name}.txt)",
            )
    return None


def rule_two_ort_builds(resolution: Mapping[str, Version], platform: Platform, min_ort: Version) -> Violation | None:
    """onnxruntime and onnxruntime-gpu together (often pulled in by onnxruntime-genai)."""
    if "onnxruntime" not in resolution or "onnxruntime-gpu" not in resolution:
        return None
    genai = " (onnxruntime-genai requires the CPU build)" if "onnxruntime-genai" in resolution else ""
    return Violation(
        "two-onnxruntime-builds",
        f"onnxruntime {resolution['onnxruntime']} and onnxruntime-gpu {resolution['onnxruntime-gpu']} together{genai}: they overwrite each other's files",
        "install one build; to export on a GPU machine build the LLM in a venv of its own (loc3r-export --builder-python, see the user guide)",
    )


Rule = Callable[[Mapping[str, Version], Platform, Version], "Violation | None"]
RULES: tuple[Rule, ...] = (rule_driver, rule_numpy_jetson_ort, rule_ort_minimum, rule_two_ort_builds)

_NO_WHEEL = re.compile(r"`?([A-Za-z0-9._-]+)(?:==([^\s`]+))?`? (?:\(v([^)]*)\) )?has no wheels with a matching (Python implementation|Python ABI|platform) tag")


def no_wheel(resolver_error: str, platform: Platform) -> Violation | None:
    """The resolver found no wheel of a package for the platform's Python or machine."""
    match = _NO_WHEEL.search(resolver_error)
    if not match:
        return None
    package, version = match.group(1), match.group(2) or match.group(3)
    what = f"Python {platform.python}" if "Python" in match.group(4) else platform.python_platform
    fix = (
        "export on Python >= 3.11 (any machine; copy the folder to the device), or build the LLM with loc3r-export --builder-python"
        if package.startswith("onnxruntime-genai")
        else f"drop what needs {package} from this install, or install on another Python/platform"
    )
    shown = f"{package} {version}" if version else package
    return Violation("no-wheel", f"{shown} has no wheel for {what} ({platform.name})", fix)


def check(resolution: Mapping[str, str], platform: Platform, min_ort: str) -> list[Violation]:
    """Every rule over one resolution (``name -> version`` as pip would install it)."""
    versions = normalize(resolution)
    minimum = Version(min_ort)
    return [v for rule in RULES if (v := rule(versions, platform, minimum))]
