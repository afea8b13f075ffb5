"""``manifest.json``: what an export wrote, for which model, and how well it matched.

Every file of the export (ONNX graphs, their external data, state files, the LLM, engines
built later) is listed under ``files`` with its size and SHA-256, written by
:func:`write_manifest`. The runtime reaches files only through :meth:`Manifest.file`,
which refuses a path that leaves the folder or that the manifest does not list, and
:meth:`Manifest.verify` checks every listed file (digests memoised in the user's cache by
each file's identity, see ``loc3r.digest``; never by a memo inside the export). The
runtime also refuses a manifest whose model checksum, precision or shapes disagree with
the bundle it is asked to run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from loc3r.digest import DigestMemo
from loc3r.errors import ModelError
from loc3r.export.external_data import check_external_data
from loc3r.fileio import OUTPUT_MARKER, finite_json, recover_interrupted, write_text_atomic

log = logging.getLogger(__name__)
MANIFEST_FILE = "manifest.json"
FORMAT = "loc3r-manifest"
VERSION = 2  # 2: every file listed with its size and SHA-256; the LLM is the model builder's decoder (context limit, prefill chunk, memory plan)
PRECISIONS = ("fp32", "fp16")  # engines.targets.Precision
ENCODER_PRECISIONS = ("fp32", "int8")  # loc3r-export --encoders
EXPORT_KIND = "export"  # the output-folder kind (loc3r.fileio) of exports
# caches that programs add to a finished export: neither listed in ``files`` nor foreign
MUTABLE_ENTRIES = ("timing.cache", "ort_trt_cache")
_REEXPORT = "re-run loc3r-export"
_RECOPY = "re-copy the whole export folder, or re-run loc3r-export"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest and the folder it describes."""

    root: Path
    data: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def model_checksum(self) -> str:
        return self.data["model"]["checksum"]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def encoders(self) -> str:
        """What the onnxruntime backend runs the encoder graphs in: ``fp32`` (the graphs
        themselves; a manifest from before ``--encoders`` existed) or ``int8`` (their INT8 forms)."""
        return self.data.get("encoders", "fp32")

    def graph_file(self, name: str) -> Path:
        """The file the onnxruntime backend runs for graph ``name``: its INT8 form when the
        export's encoders are INT8 and the graph has one, else the graph."""
        entry = self.artifacts.get(name, {})
        if self.encoders == "int8" and isinstance(entry.get("int8"), dict):
            return self.file(entry["int8"].get("file"))
        return self.artifact_path(name)

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.data["artifacts"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data["files"]

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 over the listed files' digests: identifies what these artifacts compute."""
        listed = {name: entry["sha256"] for name, entry in sorted(self.files.items())}
        return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()

    def value(self, *keys: str, kind: type | tuple[type, ...] = str) -> Any:
        """``data[keys[0]][keys[1]]...``, which must be a ``kind``; else a one-line ModelError."""
        value: Any = self.data
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or value == "":
            raise self.corrupt(f"'{'.'.join(keys)}' is missing or malformed")
        return value

    def file(self, relative: object) -> Path:
        """The path of a listed file; anything outside the folder or not listed is refused."""
        path = contained(self.root, relative, self.path)
        if relative not in self.files:
            raise self.corrupt(f"it refers to {relative!r}, which its 'files' section does not list")
        return path

    def float_tensors(self, relative: object) -> dict[str, Any]:
        """The tensors of a listed safetensors file, each floating point (bytes relabelled
        as integers in the header would be read as something else): else a ModelError."""
        import numpy as np
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(self.file(relative)))
        except (SafetensorError, TypeError, ValueError) as exc:  # e.g. bfloat16, which numpy cannot hold
            raise self.corrupt(f"{relative} is not a float32/float16 safetensors file ({exc})") from None
        wrong = sorted(name for name, tensor in tensors.items() if not np.issubdtype(tensor.dtype, np.floating))
        if wrong:
            raise self.corrupt(f"{relative} stores {wrong[0]!r} as {tensors[wrong[0]].dtype}, not floating point")
        return tensors

    def artifact_path(self, name: str) -> Path:
        if name not in self.artifacts:
            raise ModelError(f"manifest {self.path} has no {name!r} artifact", _REEXPORT)
        return self.file(self.artifacts[name]["file"])

    def tensor_shape(self, artifact: str, tensor: str) -> list[int | str]:
        """The declared shape of an input or output of ``artifact``."""
        for spec in self.artifacts[artifact]["inputs"] + self.artifacts[artifact]["outputs"]:
            if spec["name"] == tensor:
                return spec["shape"]
        raise ModelError(f"manifest artifact {artifact!r} has no tensor {tensor!r}", _REEXPORT)

    def verify(self) -> None:
        """Every listed file is there, with its size and SHA-256, and every graph's external
        data lies in listed files (``loc3r.export.external_data``): else a one-line ModelError."""
        memo = DigestMemo()
        try:
            for relative, entry in sorted(self.files.items()):
                path = self.file(relative)
                if not path.is_file():
                    raise ModelError(f"{self.root} lacks {relative}, which its manifest lists", _RECOPY)
                size = path.stat().st_size
                if size != entry["size"]:
                    raise ModelError(
                        f"{path} has {size} bytes, its manifest says {entry['size']} (truncated or replaced)", _RECOPY
                    )
                if memo.sha256(path) != entry["sha256"]:
                    raise ModelError(f"{path} does not match the sha256 in its manifest (damaged or replaced)", _RECOPY)
            listed = [self.file(relative) for relative in sorted(self.files)]
            for relative in sorted(self.files):
                if relative.endswith(".onnx"):  # before ONNX Runtime or TensorRT opens any graph
                    # remembered while every listed file keeps its identity (the graph is read with
                    # onnx, which a run that finds the verdict in the memo then never imports)
                    memo.remember(listed, f"external data of {relative} within the listed files", external_data_ok(self, relative))
        finally:
            memo.save()

    def corrupt(self, problem: str) -> ModelError:
        return ModelError(f"{self.path} is corrupt: {problem}", _REEXPORT)


def external_data_ok(manifest: Manifest, relative: str) -> Callable[[], str]:
    """``check_external_data`` of one graph as a memo computation (``"ok"`` or an error)."""

    def check() -> str:
        check_external_data(manifest.root, relative, manifest.files)
        return "ok"

    return check


def contained(root: Path, relative: object, where: Path) -> Path:
    """``root / relative`` for a relative path that stays inside ``root`` (symlinks included)."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise ModelError(f"{where} is corrupt: a file name is empty or not text ({relative!r})", _REEXPORT)
    pure = PurePosixPath(relative)
    path = root / pure
    if pure.is_absolute() or ".." in pure.parts or not path.resolve().is_relative_to(root.resolve()):
        raise ModelError(f"{where} names {relative!r}, which is outside its folder", _REEXPORT)
    return path


def load_manifest(engines_dir: str | Path) -> Manifest:
    """Read ``engines_dir/manifest.json``; anything unreadable is a one-line ModelError.

    Cheap: sections and paths are checked here, file contents by :meth:`Manifest.verify`.
    """
    root = Path(engines_dir)
    restored = recover_interrupted(root)
    if restored is not None:
        log.warning("restored %s from %s, where a run killed while replacing it had left it", root, restored.name)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ModelError(f"{root} has no {MANIFEST_FILE}", "pass the folder written by loc3r-export --out")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})", _REEXPORT) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{path} is not a loc3r manifest", "pass the folder written by loc3r-export --out")
    if data.get("version") != VERSION:
        raise ModelError(f"{path} has manifest version {data.get('version')!r}, this loc3r reads {VERSION}", f"{_REEXPORT} with this version")
    manifest = Manifest(root, data)
    check_sections(manifest)
    return manifest


def check_sections(manifest: Manifest) -> None:
    """The sections the runtime reads have the right types (a hand-edited or corrupt file
    fails here with a ModelError, not later with a KeyError or TypeError)."""
    data = manifest.data
    for key in ("model", "precision", "artifacts", "target", "files"):
        if key not in data:
            raise ModelError(f"{manifest.path} lacks the {key!r} section", _REEXPORT)
    manifest.value("model", "checksum")
    if data["precision"] not in PRECISIONS:
        raise manifest.corrupt(f"precision {data['precision']!r} is not one of {', '.join(PRECISIONS)}")
    if manifest.encoders not in ENCODER_PRECISIONS:
        raise manifest.corrupt(f"encoders {manifest.encoders!r} is not one of {', '.join(ENCODER_PRECISIONS)}")
    manifest.value("target", kind=dict)
    files = manifest.value("files", kind=dict)
    for relative, entry in files.items():
        contained(manifest.root, relative, manifest.path)
        if not (isinstance(entry, dict) and _is_size(entry.get("size")) and _SHA256.fullmatch(str(entry.get("sha256")))):
            raise manifest.corrupt(f"the size or sha256 of {relative!r} is malformed")
    artifacts = manifest.value("artifacts", kind=dict)
    for name, entry in artifacts.items():
        if not _valid_artifact(entry):
            raise manifest.corrupt(f"artifact {name!r} is malformed")
        manifest.file(entry["file"])
    if data.get("llm") is not None:
        check_llm_section(manifest)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_artifact(entry: object) -> bool:
    """An artifact names its file and lists its inputs and outputs with names and shapes."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return False
    for key in ("inputs", "outputs"):
        specs = entry.get(key)
        if not isinstance(specs, list) or not specs:
            return False
        for spec in specs:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("shape"), list):
                return False
            if not all(isinstance(d, str) and d or _is_size(d) and d > 0 for d in spec["shape"]):
                return False
    return True


def write_manifest(folder: Path, data: dict[str, Any]) -> Manifest:
    """Write ``data`` as ``folder/manifest.json`` (atomically), its ``files`` section
    completed with the size and SHA-256 of every file in ``folder`` not yet listed (the
    output marker and the caches in ``MUTABLE_ENTRIES`` excepted)."""
    files = dict(data.get("files") or {})
    memo = DigestMemo()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        top = relative.split("/", 1)[0]
        if relative in files or relative in (MANIFEST_FILE, OUTPUT_MARKER) or top in MUTABLE_ENTRIES:
            continue
        if path.is_file() and not path.is_symlink():
            files[relative] = {"size": path.stat().st_size, "sha256": memo.sha256(path)}
    memo.save()
    data = {**data, "files": files}
    write_text_atomic(folder / MANIFEST_FILE, finite_json(data, indent=2) + "\n")
    return Manifest(folder, data)
def check_llm_section(manifest: Manifest) -> None:
    """The LLM section names listed files, its weights' format, and a positive context limit
    and prefill chunk."""
    manifest.value("llm", kind=dict)
    for part in ("decoder", "embeddings"):
        manifest.file(manifest.value("llm", part, "file"))
    manifest.value("llm", "quantization", "layers")
    for key in ("context_tokens", "prefill_chunk_tokens"):
        if manifest.value("llm", key, kind=int) < 1:
            raise manifest.corrupt(f"'llm.{key}' is not a positive number")


def check_manifest_matches(manifest: Manifest, model_id: str, checksum: str, expected_shapes: dict[str, dict[str, list[int | str]]]) -> None:
    """Refuse a manifest made for another model, or whose graph shapes disagree with it."""
    if manifest.model_checksum != checksum:
        raise ModelError(
            f"engines in {manifest.root} were exported from model {manifest.data['model'].get('id')} "
            f"(checksum {manifest.model_checksum[:12]}), not from {model_id} (checksum {checksum[:12]})",
            "re-export them from this model with loc3r-export, or pass the matching --model",
        )
    for artifact, tensors in expected_shapes.items():
        if artifact not in manifest.artifacts:
            continue
        for tensor, shape in tensors.items():
            found = manifest.tensor_shape(artifact, tensor)
            if list(found) != list(shape):
                raise ModelError(
                    f"manifest {artifact}.{tensor} has shape {found}, the model needs {shape}",
                    "re-export with loc3r-export for this model",
                )
