"""``python -m loc3r.engines.resolve TARGET``: what pip would install for each documented
install route, resolved for the route's platform and Python without the hardware
(``uv pip compile --python-platform ... --python-version ...``), checked against the known-bad
combinations of :mod:`loc3r.engines.install_rules`.

The commands are read from ``docs/user-guide.md``: the fenced block after a
``<!-- install: ROUTE -->`` line; each ``pip install`` line in it is resolved, all together
(they end up in one environment). Exit 0 when every route resolves without a known-bad
combination or is skipped (no ``uv``, the index unreachable: said with the reason); 1 when a
route fails; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from loc3r.cli_support import ArgumentParser, run_cli
from loc3r.engines.install_rules import DRIVER_FOR_CUDA, Platform, Violation, check, cuda_needs, fmt, no_wheel, normalize
from loc3r.errors import InputError

PROG = "python -m loc3r.engines.resolve"
REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "user-guide.md"
#: the minimum ONNX Runtime of loc3r's graphs (the LLM decoder's; loc3r.export.runtime_versions)
MIN_ORT = "1.23"
PYPI = "https://pypi.org/simple"
#: PyPI download stubs that fetch the real wheel from NVIDIA's index at install time: their
#: metadata cannot be had without that index, and the package beside them names the CUDA build
STUBS = ("tensorrt-cu12-libs", "tensorrt-cu13-libs")
NEVER = 'python_version < "0"'  # an override marker that removes a requirement

ROUTES: dict[str, Platform] = {
    "jetpack6": Platform("jetpack6", "aarch64-unknown-linux-gnu", "3.10", (12, 6), minor_compat=False, jetson_ort=True),
    "x86-cuda12": Platform("x86-cuda12", "x86_64-manylinux_2_28", "3.10", (12, 0), minor_compat=True, jetson_ort=False),
    "x86-cuda13": Platform("x86-cuda13", "x86_64-manylinux_2_28", "3.12", (13, 0), minor_compat=True, jetson_ort=False),
    "cpu": Platform("cpu", "x86_64-manylinux_2_28", "3.11", None, minor_compat=True, jetson_ort=False),
}
#: packages a route takes from the system instead of the index (JetPack's torch, seen
#: through a venv made with --system-site-packages)
FROM_SYSTEM = {"jetpack6": ("torch",)}
_BLOCK = re.compile(r"<!-- install: ([\w.-]+) -->[ \t]*\n[ \t]*```[^\n]*\n(.*?)\n[ \t]*```", re.S)
_IGNORED_FLAGS = ("-q", "--quiet", "-U", "--upgrade")


@dataclass
class Install:
    """The ``pip install`` lines of one route, gathered into one resolution."""

    requirements: list[str] = field(default_factory=list)
    editables: list[str] = field(default_factory=list)
    constraints: list[Path] = field(default_factory=list)
    indexed: dict[str, list[str]] = field(default_factory=dict)  # index URL -> requirements from it


def doc_blocks(text: str) -> dict[str, list[str]]:
    """route -> the ``pip install`` command lines of its block in the user guide."""
    return {route: [line for line in body.splitlines() if re.search(r"\bpip install\b", line)] for route, body in _BLOCK.findall(text)}


def parse_install(lines: Sequence[str], repo: Path) -> Install:
    """The requirements, constraint files and indexes of ``pip install`` lines."""
    install = Install()
    for line in lines:
        words = shlex.split(line.split("pip install", 1)[1], comments=True)
        index = None
        requirements: list[str] = []
        i = 0
        while i < len(words):
            word = words[i]
            if word in ("-e", "--editable", "-c", "--constraint", "--index-url", "--extra-index-url", "-i"):
                value = words[i + 1]
                if word in ("-e", "--editable"):
                    path, _, extras = value.partition("[")
                    install.editables.append(f"{(repo / path).resolve()}{'[' + extras if extras else ''}")
                elif word in ("-c", "--constraint"):
                    install.constraints.append(repo / value)
                else:
                    index = value
                i += 2
                continue
            if word.startswith("-"):
                if word not in _IGNORED_FLAGS:
                    raise InputError(f"the install line {line.strip()!r} uses {word}, which the resolver check does not model", "keep the documented commands to -e, -c, --index-url and requirements")
            else:
                requirements.append(word)
            i += 1
        (install.indexed.setdefault(index, []) if index else install.requirements).extend(requirements)
    return install


def reachable(url: str, timeout: float = 10.0) -> str | None:
    """None when ``url`` answers, else why not (one line)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def lowest_version(requirement: str) -> str | None:
    """The lowest version a requirement admits, from its ``>=`` / ``==`` / ``~=`` bounds."""
    try:
        spec = Requirement(requirement).specifier
    except InvalidRequirement:
        return None
    bounds = [s.version.rstrip(".*") for s in spec if s.operator in (">=", "==", "~=", "===")]
    return min(bounds, key=lambda v: tuple(int(p) for p in re.findall(r"\d+", v))) if bounds else None


@dataclass
class Outcome:
    """One route's check: ``skipped`` (with why) or the resolution and what it broke."""

    route: str
    lines: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    skipped: str | None = None


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_uv(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)


def find_uv() -> str | None:
    """``uv`` beside this Python (a venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.is_file() else shutil.which("uv")


def parse_compiled(text: str) -> dict[str, str]:
    """``name -> version`` from ``uv pip compile`` output (``name==version`` lines)."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)", line.strip())
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def check_route(route: str, commands: Sequence[str], repo: Path = REPO, runner: Runner = run_uv, uv: str | None = None, probe: Callable[[str], str | None] = reachable) -> Outcome:
    """Resolve one route's commands for its platform and check the result."""
    platform = ROUTES[route]
    outcome = Outcome(route)
    uv = uv or find_uv()
    if uv is None:
        outcome.skipped = "uv is not installed (pip install uv)"
        return outcome
    if (why := probe(PYPI)) is not None:
        outcome.skipped = f"the package index cannot be reached ({why})"
        return outcome
    install = parse_install(commands, repo)
    modelled: dict[str, str] = {}
    extra_indexes = []
    for index, requirements in install.indexed.items():
        if (why := probe(index)) is None:
            extra_indexes.append(index)
            install.requirements.extend(requirements)
            continue
        for requirement in requirements:
            lowest = lowest_version(requirement)
            if lowest is None:
                outcome.skipped = f"{index} cannot be reached ({why}) and {requirement!r} names no version to check"
                return outcome
            modelled[canonicalize_name(Requirement(requirement).name)] = lowest
            outcome.lines.append(f"not resolved here: {requirement} from {index} ({why}); checked as {lowest}")
    with tempfile.TemporaryDirectory(prefix="loc3r-resolve-") as tmp:
        requirements_in, overrides = Path(tmp) / "requirements.in", Path(tmp) / "overrides.txt"
        lines = [f"-e {e}" for e in install.editables] + install.requirements
        requirements_in.write_text("\n".join(lines) + "\n", encoding="utf-8")
        system = FROM_SYSTEM.get(route, ())
        # what comes from elsewhere (the system, an index not reached) is kept out of uv's resolution
        overrides.write_text("".join(f"{name} ; {NEVER}\n" for name in (*STUBS, *system, *modelled)), encoding="utf-8")
        args = [uv, "pip", "compile", str(requirements_in), "--python-platform", platform.python_platform, "--python-version", platform.python]
        args += ["--override", str(overrides), "--no-header", "--no-annotate", "--quiet"]
        args += [a for c in install.constraints for a in ("-c", str(c))]
        args += [a for i in extra_indexes for a in ("--extra-index-url", i, "--index-strategy", "unsafe-best-match")]
        done = runner(args)
    if done.returncode != 0:
        error = done.stderr.strip()
        violation = no_wheel(error, platform)
        if violation is None and re.search(r"(?i)failed to fetch|dns error|connect|timed out|network", error):
            outcome.skipped = f"the resolver could not reach the index ({error.splitlines()[0] if error else 'no message'})"
            return outcome
        outcome.violations.append(violation or Violation("unresolvable", f"the install does not resolve: {' '.join(error.split())[:400]}", "fix the documented command"))
        return outcome
    resolution = {**parse_compiled(done.stdout), **modelled}
    if system:
        outcome.lines.insert(0, f"from the system: {', '.join(system)} (a venv made with --system-site-packages)")
    outcome.lines.insert(0, summary(resolution))
    needs = cuda_needs(normalize(resolution))
    if needs and platform.driver_cuda:
        top = needs[0].version
        if platform.minor_compat and top[0] in DRIVER_FOR_CUDA:
            outcome.lines.append(f"needs a CUDA {top[0]} driver (>= {DRIVER_FOR_CUDA[top[0]]}): {needs[0].why}")
        else:
            outcome.lines.append(f"needs a driver of CUDA >= {fmt(top)}: {needs[0].why}")
    outcome.violations += check(resolution, platform, MIN_ORT)
    return outcome


KEY_PACKAGES = ("numpy", "cuda-python", "cuda-bindings", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda", "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "torch")


def summary(resolution: dict[str, str]) -> str:
    shown = ", ".join(f"{n} {resolution[n]}" for n in KEY_PACKAGES if n in resolution)
    return f"resolved {len(resolution)} packages: {shown}"


def render(outcome: Outcome) -> str:
    platform = ROUTES[outcome.route]
    driver = f", driver CUDA {fmt(platform.driver_cuda)}" if platform.driver_cuda else ""
    head = f"{outcome.route} ({platform.python_platform}, Python {platform.python}{driver}): "
    if outcome.skipped:
        return head + f"skipped: {outcome.skipped}"
    status = "FAIL" if outcome.violations else "ok"
    lines = [head + status, *(f"  {line}" for line in outcome.lines)]
    lines += [f"  - {v.rule}: {v.problem}\n    fix: {v.fix}" for v in outcome.violations]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description="Resolve each documented install for its platform (uv, no hardware) and check it against the known-bad combinations.")
    parser.add_argument("target", choices=[*ROUTES, "all"], help="an install route of docs/user-guide.md, or all")
    parser.add_argument("--doc", type=Path, default=DOC, help="the guide holding the install blocks (default: docs/user-guide.md)")
    parser.add_argument("--debug", action="store_true")
    args: argparse.Namespace = parser.parse_args(argv)

    def body() -> int:
        if not args.doc.is_file():
            raise InputError(f"{args.doc} does not exist", "run from a checkout of loc3r, or pass --doc docs/user-guide.md")
        blocks = doc_blocks(args.doc.read_text(encoding="utf-8"))
        routes = list(ROUTES) if args.target == "all" else [args.target]
        missing = [r for r in routes if r not in blocks]
        if missing:
            raise InputError(f"{args.doc} has no install block for {', '.join(missing)}", "mark it with <!-- install: ROUTE --> before its fenced block")
        outcomes = [check_route(route, blocks[route], args.doc.resolve().parents[1]) for route in routes]
        print("\n".join(render(o) for o in outcomes))
        return 1 if any(o.violations for o in outcomes) else 0

    return run_cli(PROG, body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
