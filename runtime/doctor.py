"""``loc3r-doctor [--engines DIR]``: what this machine can run, on one screen, every problem
with its fix; with ``--engines``, whether this device can run that export and how.

Exit code 0 when nothing blocks, 1 when a problem was found (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import Version

from loc3r.cli_support import ArgumentParser, run_cli
from loc3r.engines.install_rules import DRIVER_FOR_CUDA, CudaNeed, cuda_needs, driver_runs, fmt, normalize
from loc3r.errors import Loc3rError
from loc3r.runtime import cuda, ort
from loc3r.runtime.ort import distribution

PROG = "loc3r-doctor"
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
JETSON_ORT_INDEX = "https://pypi.jetson-ai-lab.io/jp6/cu126"
GIB = 1 << 30
#: the oldest ONNX Runtime that loads the LLM decoder loc3r exports (loc3r.export.runtime_versions)
MIN_ORT = "1.23"
GENAI_SERIES = "0.18."  # the onnxruntime-genai releases loc3r's LLM builder subclass is written for


@dataclass(frozen=True)
class Finding:
    """One line of the report; ``problem`` and ``fix`` when something is wrong."""

    label: str
    value: str
    problem: str | None = None
    fix: str | None = None
    missing_extra: str | None = None  # an optional extra that is not installed (not a problem)


@dataclass
class Machine:
    """What the probes found, shared by the checks that follow them."""

    jetson: str | None = None  # the L4T release, on a Jetson
    gpu: Any = None  # runtime.cuda.GpuInfo
    trt_version: str | None = None
    providers: tuple[str, ...] = ()


def module_version(name: str) -> str | None:
    """``__version__`` of an importable module, or None when it does not import."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "?"))


def jetson_release() -> str | None:
    """``L4T R36.4.0`` on a Jetson (from /etc/nv_tegra_release), else None."""
    try:
        first = TEGRA_RELEASE.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(part.strip().split(": ", 1) for part in first.lstrip("# ").split(",") if ": " in part)
    release, revision = first.lstrip("# ").split(" ", 1)[0], fields.get("REVISION", "?")
    return f"L4T {release}.{revision}"


def system_site_packages() -> bool | None:
    """Whether this venv sees the system's packages (None outside a venv)."""
    if sys.prefix == sys.base_prefix:
        return None
    config = Path(sys.prefix) / "pyvenv.cfg"
    text = config.read_text(encoding="utf-8") if config.is_file() else ""
    return any(line.replace(" ", "").lower() == "include-system-site-packages=true" for line in text.splitlines())


# -- checks ------------------------------------------------------------------------------------


def check_platform(machine: Machine) -> Finding:
    machine.jetson = jetson_release()
    where = f"Jetson, {machine.jetson}" if machine.jetson else platform.system()
    return Finding("platform", f"{where}, {platform.machine()}")


def check_python(machine: Machine) -> Finding:
    shared = system_site_packages()
    venv = "no venv" if shared is None else f"venv {sys.prefix}, system site-packages: {'yes' if shared else 'no'}"
    finding = Finding("python", f"{platform.python_version()} ({venv})")
    if machine.jetson and shared is False and module_version("tensorrt") is None:
        return Finding(
            finding.label,
            finding.value,
            "this venv hides JetPack's TensorRT (it lives in the system Python)",
            "recreate it: python3 -m venv --system-site-packages .venv && .venv/bin/pip install -e '.[jetson]'",
        )
    return finding


def check_torch(machine: Machine) -> Finding:
    try:
        import torch
    except ImportError:
        return Finding("torch", "not installed", "loc3r needs torch (CPU is enough)", "pip install -e .")
    cuda = torch.cuda.is_available()
    note = "" if cuda else " (the onnxruntime and tensorrt backends do not need it)"
    return Finding("torch", f"{torch.__version__}, CUDA: {'yes' if cuda else 'no'}{note}")


def check_onnxruntime(machine: Machine) -> Finding:
    cpu, gpu = distribution("onnxruntime"), distribution("onnxruntime-gpu")
    install_gpu = f"pip install onnxruntime-gpu --index-url {JETSON_ORT_INDEX}" if machine.jetson else "pip install -e '.[gpu]'"
    if cpu and gpu:
        return Finding(
            "onnxruntime",
            f"onnxruntime {cpu} AND onnxruntime-gpu {gpu}",
            "both builds are installed: they overwrite each other's files",
            f"pip uninstall -y onnxruntime onnxruntime-gpu && {install_gpu}",
        )
    build = "onnxruntime-gpu" if gpu else "onnxruntime"
    try:
        import onnxruntime
    except ImportError as exc:
        if cpu or gpu:
            return ort_import_failed(machine, build, gpu or cpu or "?", exc)
        fix = install_gpu if machine.gpu else "pip install -e '.[cpu]'"
        return Finding("onnxruntime", "not installed", "ONNX Runtime is needed to export, to check engines at build, for the LLM and for --backend onnxruntime", fix)
    machine.providers = tuple(onnxruntime.get_available_providers())
    shown = ", ".join(p.removesuffix("ExecutionProvider") for p in machine.providers)
    finding = Finding("onnxruntime", f"{onnxruntime.__version__} ({build}), providers: {shown}")
    if machine.gpu and "CUDAExecutionProvider" not in machine.providers:
        return Finding(finding.label, finding.value, "a GPU is here but ONNX Runtime has no CUDA provider", f"pip uninstall -y onnxruntime && {install_gpu}")
    if Version(onnxruntime.__version__) < Version(MIN_ORT):
        return Finding(finding.label, finding.value, f"older than {MIN_ORT}, which loc3r's LLM decoder needs (opset 22, GroupQueryAttention with 12 inputs)", f"pip install '{build}>={MIN_ORT}'")
    return finding


def ort_import_failed(machine: Machine, build: str, version: str, exc: ImportError) -> Finding:
    """ONNX Runtime is installed but does not import: numpy 2 under a build for numpy 1.x
    (the jetson-ai-lab wheels), or a broken install."""
    numpy = module_version("numpy")
    value = f"{build} {version} installed, does not import"
    if numpy and Version(numpy).major >= 2:
        constraints = " -c engines/constraints/jetpack6.txt" if machine.jetson else ""
        return Finding("onnxruntime", value, f"this {build} was built for numpy 1.x and numpy {numpy} is installed", f"pip install 'numpy<2'{constraints}")
    return Finding("onnxruntime", value, f"import onnxruntime fails ({exc})", f"pip install --force-reinstall {build}")


def check_tensorrt_provider(machine: Machine) -> list[Finding]:
    """ONNX Runtime lists the TensorRT EP whenever it was built with it; it works only where
    libnvinfer loads (pip's TensorRT keeps it in the tensorrt_libs package)."""
    if "TensorrtExecutionProvider" not in machine.providers:
        return []
    why = ort.nvinfer_error()
    if why is None:
        return [Finding("  TensorRT EP", "libnvinfer loads: --backend onnxruntime can use it")]
    if machine.jetson:
        fix = "sudo apt install libnvinfer10 (JetPack's TensorRT)"
    else:
        cu = "cu13" if any(n.version[0] >= 13 for n in cuda_needs(normalize(installed())) if n.package == "onnxruntime-gpu") else "cu12"
        fix = f"pip install tensorrt-{cu}-libs (the CUDA build of onnxruntime-gpu), or add TensorRT's lib folder to LD_LIBRARY_PATH"
    return [Finding("  TensorRT EP", "listed, but does not load", f"{why}: --backend onnxruntime runs on the CUDA provider only", fix)]


def installed() -> dict[str, str]:
    """Every installed distribution: name -> version."""
    return {d.metadata["Name"]: d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def check_cuda_driver(machine: Machine) -> Finding:
    """The CUDA driver against what the installed runtime libraries (and cuda-python's own
    runtime) need; a Jetson has no minor-version compatibility."""
    driver = cuda.driver_cuda_version()
    needs = cuda_needs(normalize(installed()))
    runtime = cuda.runtime_cuda_version() if driver else None
    if runtime:
        needs = sorted([*needs, CudaNeed(runtime, "cuda-python", f"cuda-python runs the CUDA {fmt(runtime)} runtime")], key=lambda n: n.version, reverse=True)
    wanted = f"; installed libraries need CUDA {fmt(needs[0].version)} ({needs[0].package})" if needs else ""
    if driver is None:
        return Finding("CUDA driver", f"none{wanted}")
    compat = machine.jetson is None
    failing = [n for n in needs if not driver_runs(driver, n.version, compat)]
    value = f"CUDA {fmt(driver)}{wanted}"
    if not failing:
        return Finding("CUDA driver", value)
    need = failing[0]
    note = "" if compat else " (a Jetson has no CUDA minor-version compatibility)"
    problem = f"{need.why}, newer than the driver's CUDA {fmt(driver)}{note}: it fails with cudaErrorInsufficientDriver"
    if machine.jetson:
        fix = "pip install -e '.[jetson]' -c engines/constraints/jetpack6.txt (cuda-python 12.6, numpy<2)"
    elif need.version[0] > driver[0] and need.version[0] in DRIVER_FOR_CUDA:
        route = f"x86-cuda{driver[0]}"
        fix = f"update the NVIDIA driver to >= {DRIVER_FOR_CUDA[need.version[0]]}, or install the {route} route (docs/user-guide.md, -c engines/constraints/{route}.txt)"
    else:
        fix = "update the NVIDIA driver, or install the route for this driver's CUDA (docs/user-guide.md)"
    return Finding("CUDA driver", value, problem, fix)


def check_tensorrt(machine: Machine) -> Finding:
    machine.trt_version = module_version("tensorrt")
    if machine.trt_version:
        return Finding("tensorrt", machine.trt_version)
    if machine.gpu is None:
        return Finding("tensorrt", "not installed (needed only on a GPU device)")
    if machine.jetson:
        fix = "sudo apt install python3-libnvinfer (JetPack), in a venv made with --system-site-packages"
    else:
        fix = "pip install -e '.[tensorrt]'"
    return Finding("tensorrt", "not importable", "no TensorRT: --backend tensorrt and loc3r-export build cannot run here", fix)


def check_gpu(machine: Machine) -> list[Finding]:
    """cuda-python and the GPU it sees (a CUDA torch is only a fallback for the GPU facts)."""
    from loc3r.runtime.cuda import gpu_info

    try:
        machine.gpu = gpu_info()
    except Loc3rError as exc:
        version = distribution("cuda-python")
        if machine.jetson:
            problem, fix = exc.problem, "pip install -e '.[jetson]' (cuda-python 12 for JetPack 6's CUDA 12.6)"
            return [Finding("cuda-python", version or "not installed"), Finding("GPU", "none visible", problem, fix)]
        return [Finding("cuda-python", version or "not installed"), Finding("GPU", exc.problem)]
    gpu = machine.gpu
    shown = Finding("GPU", f"{gpu.name} (sm_{gpu.sm}), {gpu.total_bytes / GIB:.1f} GiB, {gpu.free_bytes / GIB:.1f} GiB free (via {gpu.source})")
    if gpu.source == "cuda-python":
        return [Finding("cuda-python", distribution("cuda-python") or "installed"), shown]
    missing = Finding("cuda-python", "not installed", "the tensorrt backend needs cuda-python (it does not use CUDA torch)", "pip install 'cuda-python>=12,<13'")
    return [missing, shown]


def check_extras(machine: Machine) -> list[Finding]:
    """The optional extras: ``[export]`` (onnxruntime-genai's builder, for the LLM) and
    ``[serve]`` (the HTTP server); missing ones are said, with their install line."""
    from loc3r.serve.cli import SERVE_MODULES

    findings = []
    if importlib.util.find_spec("onnxruntime_genai") is None:
        findings.append(Finding("export extra", "not installed (loc3r-export's LLM needs it: pip install -e '.[export]')", missing_extra="export"))
    else:
        version = distribution("onnxruntime-genai") or "?"
        finding = Finding("export extra", f"onnxruntime-genai {version}")
        if version != "?" and not version.startswith(GENAI_SERIES):
            finding = Finding(
                finding.label, finding.value, f"loc3r's LLM builder is written for onnxruntime-genai {GENAI_SERIES}x",
                "pip install -e '.[export]' (it pins onnxruntime-genai>=0.18,<0.19)",
            )
        findings.append(finding)
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        needs = f"not installed: {', '.join(missing)} (loc3r-serve needs them: pip install -e '.[serve]')"
        findings.append(Finding("serve extra", needs, missing_extra="serve"))
    else:
        findings.append(Finding("serve extra", f"installed ({', '.join(SERVE_MODULES)})"))
    return findings


_OVERHEAD_CHILD = """
import sys
import numpy as np
from onnx import TensorProto, helper
from loc3r.runtime.cuda import gpu_info
import onnxruntime as ort
gpu_info()  # this process's CUDA context
graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
    [helper.make_tensor_value_info(n, TensorProto.FLOAT, [256, 256]) for n in "ab"], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [256, 256])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
x = np.ones((256, 256), np.float32)
session.run(None, {"a": x, "b": x})
print("ready", flush=True)
sys.stdin.read()
"""


def measure_runtime_overhead() -> int:
    """Bytes of GPU memory a second process takes for its CUDA context and ONNX Runtime's
    CUDA provider running a MatMul (cuBLAS loaded): free memory before it starts minus free
    memory while it holds them. Other programs allocating meanwhile would skew it."""
    import subprocess

    from loc3r.runtime.cuda import call, import_cudart

    cudart = import_cudart()
    before, _ = call(cudart, "cudaMemGetInfo")
    child = subprocess.Popen([sys.executable, "-c", _OVERHEAD_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready = child.stdout.readline().strip() if child.stdout else ""
        if ready != "ready":
            raise Loc3rError("the measuring process could not open a CUDA session")
        during, _ = call(cudart, "cudaMemGetInfo")
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=60)
    return max(int(before) - int(during), 0)


def check_runtime_overhead(machine: Machine) -> list[Finding]:
    """The memory plan's assumed GPU runtime overhead against the figure measured here."""
    from loc3r.export.memory_plan import GPU_OVERHEAD

    if machine.gpu is None or machine.gpu.source != "cuda-python" or "CUDAExecutionProvider" not in machine.providers:
        return []
    try:
        measured = measure_runtime_overhead()
    except Loc3rError as exc:
        return [Finding("GPU overhead", f"not measured ({exc.problem}); the memory plan assumes {GPU_OVERHEAD / GIB:.1f} GiB")]
    verdict = "within" if measured <= GPU_OVERHEAD else "above"
    value = f"{measured / GIB:.2f} GiB measured (a CUDA context + ONNX Runtime's CUDA provider), {verdict} the memory plan's {GPU_OVERHEAD / GIB:.1f} GiB assumption"
    if measured > GPU_OVERHEAD:
        return [Finding("GPU overhead", value, "exports' memory plans assume less runtime overhead than this device takes", "leave that much more memory free, or export with a smaller --context-tokens")]
    return [Finding("GPU overhead", value)]


def check_manifest(machine: Machine, engines: Path) -> list[Finding]:
    """Can this device run the export in ``engines``, and with which backend."""
    from loc3r.export.manifest import load_manifest
    from loc3r.export.tensorrt_build import engine_file_name

    try:
        manifest = load_manifest(engines)
    except Loc3rError as exc:
        return [Finding("export", str(engines), exc.problem, exc.fix)]
    data = manifest.data
    plan = data.get("device_build")
    target = data["target"]["name"]
    size = sum(p.stat().st_size for p in manifest.root.rglob("*") if p.is_file()) / GIB
    head = Finding("export", f"{manifest.root}: target {target}, {data['precision']}, {size:.2f} GiB on disk")
    if not plan:
        return [head, Finding("  backends", "torch, onnxruntime (CPU provider)")]
    findings = [head]
    if machine.gpu is None:
        return [*findings, Finding("  device", "no GPU", f"{target} is a GPU export", "run it on the device, or export with --target cpu")]
    built = data.get("engines")
    if built:
        wanted = {engine_file_name(n, machine.trt_version or "0.0", machine.gpu.sm) for n in built["files"]}
        if machine.trt_version and set(built["files"].values()) == wanted:
            findings.append(Finding("  tensorrt backend", f"engines for TensorRT {built['trt_version']} / sm_{built['sm']}: usable here"))
        else:
            here = f"TensorRT {machine.trt_version or 'missing'} / sm_{machine.gpu.sm}"
            findings.append(Finding("  tensorrt backend", f"engines for TensorRT {built['trt_version']} / sm_{built['sm']}", f"this device has {here}", f"loc3r-export build --manifest {manifest.root}/manifest.json"))
    else:
        findings.append(Finding("  tensorrt backend", "engines not built yet", "--backend tensorrt needs them", f"loc3r-export build --manifest {manifest.root}/manifest.json"))
    if "CUDAExecutionProvider" in machine.providers:
        findings.append(Finding("  onnxruntime backend", "GPU providers present: --backend onnxruntime can run it"))
    if size > machine.gpu.free_bytes / GIB:
        findings.append(Finding("  memory", f"{size:.2f} GiB of artifacts, {machine.gpu.free_bytes / GIB:.1f} GiB free", "the export may not fit in free memory", "close other programs, or export a smaller LLM format (--llm int4)"))
    return findings


def diagnose(engines: Path | None = None) -> list[Finding]:
    """Every check, in the order shown."""
    machine = Machine()
    findings = [check_platform(machine), check_python(machine), check_torch(machine)]
    gpu = check_gpu(machine)
    findings += [check_onnxruntime(machine), *check_tensorrt_provider(machine), check_tensorrt(machine), check_cuda_driver(machine), *gpu, *check_extras(machine)]
    findings += check_runtime_overhead(machine)
    if engines is not None:
        findings += check_manifest(machine, engines)
    return findings


def render(findings: Sequence[Finding]) -> str:
    """The one-screen report: one line per finding, then the problems with their fixes."""
    width = max(len(f.label) for f in findings) + 2
    lines = [f"{PROG}: this machine, for loc3r"]
    lines += [f"  {f.label:<{width}}{f.value}{'   <- problem' if f.problem else ''}" for f in findings]
    problems = [f for f in findings if f.problem]
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines += [f"  - {f.label.strip()}: {f.problem}" + (f"\n    fix: {f.fix}" if f.fix else "") for f in problems]
    else:
        extras = [f.missing_extra for f in findings if f.missing_extra]
        lines.append("no problems found" + (f" (optional extras not installed: {', '.join(extras)})" if extras else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description="Check this machine (and an export) for loc3r: versions, GPU, providers, engines; every problem with its fix.")
    parser.add_argument("--engines", type=Path, help="an export folder (loc3r-export --out): can this device run it?")
    parser.add_argument("--debug", action="store_true")
    args: argparse.Namespace = parser.parse_args(argv)

    def body() -> int:
        findings = diagnose(args.engines)
        print(render(findings))
        return 1 if any(f.problem for f in findings) else 0

    return run_cli(PROG, body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
