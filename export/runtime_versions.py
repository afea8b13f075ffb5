"""The oldest ONNX Runtime (and TensorRT) each exported graph runs on, recorded in the manifest
(``runtime_minimums``) and checked before a session is created.

ONNX Runtime minimums, measured on CPU builds (1.20 to 1.32) with the builder's decoder:
1.20 refuses opset 22; 1.21 and 1.22 refuse ``GroupQueryAttention`` with 12 inputs; 1.23
loads it and matches 1.32 exactly. Graphs within opset 21 and the standard domain run on
loc3r's floor, 1.20. Opset 23 (CPU exports: fused ``Attention`` nodes): 1.23.2 runs the small
preset's CUT3R graphs and gives camera tokens within 6.6e-7 of 1.32's (1.22 not tried). TensorRT: engines are built on the device with TensorRT >= 10.3 (the
strongly typed and the pinned FP16 paths both exist there; JetPack 6 ships 10.3).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from loc3r.errors import InputError

if TYPE_CHECKING:  # read at export time only: a run checks versions from the manifest without onnx
    import onnx

ORT_FLOOR = "1.20"
TRT_FLOOR = "10.3"
#: default-domain opset -> the first ONNX Runtime that loads it (above ORT_FLOOR's 21)
ORT_FOR_OPSET = {22: "1.21", 23: "1.23"}
#: GroupQueryAttention with more inputs than 1.22's schema (11) needs 1.23
GQA_INPUTS_1_22 = 11
LLM = "llm"


def minimum_onnxruntime(model: onnx.ModelProto) -> tuple[str, str]:
    """(version, why) of the oldest ONNX Runtime that loads ``model``."""
    found = [(ORT_FLOOR, "loc3r's floor (opset <= 21)")]
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset in ORT_FOR_OPSET:
        found.append((ORT_FOR_OPSET[opset], f"opset {opset}"))
    elif opset > max(ORT_FOR_OPSET):
        found.append((onnx_runtime_version(), f"opset {opset}, newer than loc3r's table: the version that checked the export"))
    gqa = max((len(n.input) for n in model.graph.node if n.op_type == "GroupQueryAttention"), default=0)
    if gqa > GQA_INPUTS_1_22:
        found.append(("1.23", f"GroupQueryAttention with {gqa} inputs"))
    return max(found, key=lambda pair: Version(pair[0]))


def onnx_runtime_version() -> str:
    import onnxruntime

    return Version(onnxruntime.__version__).base_version


def graph_minimums(path: Path, tensorrt: bool) -> dict[str, Any]:
    """The manifest entry of one graph (its weights are not read)."""
    import onnx

    version, why = minimum_onnxruntime(onnx.load(str(path), load_external_data=False))
    return {"onnxruntime": version, "onnxruntime_why": why, "tensorrt": TRT_FLOOR if tensorrt else None}


def runtime_minimums(folder: Path, artifacts: Mapping[str, Any], llm: Mapping[str, Any] | None, gpu: bool) -> dict[str, Any]:
    """``runtime_minimums`` for an export in ``folder``: every artifact, and the LLM decoder
    (ONNX Runtime only: it has no TensorRT engine)."""
    section = {name: graph_minimums(folder / entry["file"], gpu) for name, entry in artifacts.items()}
    if llm:
        section[LLM] = graph_minimums(folder / llm["decoder"]["file"], False)
    return section


def check_onnxruntime(section: Mapping[str, Any] | None, names: Iterable[str], installed: str) -> None:
    """Refuse, in one line, an ONNX Runtime older than any of ``names`` needs (a manifest
    written before the section existed is not checked here)."""
    if not isinstance(section, Mapping):
        return
    have = Version(installed)
    needs = [(Version(str(section[n]["onnxruntime"])), n, section[n].get("onnxruntime_why", "")) for n in names if isinstance(section.get(n), Mapping)]
    too_new = [need for need in needs if have < need[0]]
    if too_new:
        version, name, why = max(too_new)
        raise InputError(
            f"ONNX Runtime {installed} is older than {version}, which the export's {name} graph needs ({why})",
            f"pip install 'onnxruntime>={version}' (or onnxruntime-gpu>={version}; see loc3r-doctor)",
        )
