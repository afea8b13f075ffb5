"""``manifest.json``: what an export wrote, for which model, and how well it matched.

The runtime refuses a manifest whose model checksum, precision or shapes disagree with
the bundle it is asked to run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loc3r.errors import ModelError

MANIFEST_FILE = "manifest.json"
FORMAT = "loc3r-manifest"
VERSION = 2  # 2: the LLM is the model builder's decoder (context limit, prefill chunk, memory plan)
PRECISIONS = ("fp32", "fp16")  # engines.targets.Precision


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest and the folder it describes."""

    root: Path
    data: dict[str, Any]

    @property
    def model_checksum(self) -> str:
        return self.data["model"]["checksum"]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.data["artifacts"]

    def artifact_path(self, name: str) -> Path:
        if name not in self.artifacts:
            raise ModelError(f"manifest {self.root / MANIFEST_FILE} has no {name!r} artifact", "re-run loc3r-export")
        return self.root / self.artifacts[name]["file"]

    def input_shape(self, artifact: str, tensor: str) -> list[int | str]:
        for spec in self.artifacts[artifact]["inputs"]:
            if spec["name"] == tensor:
                return spec["shape"]
        raise ModelError(f"manifest artifact {artifact!r} has no input {tensor!r}", "re-run loc3r-export")


def load_manifest(engines_dir: str | Path) -> Manifest:
    """Read ``engines_dir/manifest.json``; anything unreadable is a one-line ModelError."""
    root = Path(engines_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ModelError(f"{root} has no {MANIFEST_FILE}", "pass the folder written by loc3r-export --out")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})", "re-run loc3r-export") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{path} is not a loc3r manifest", "pass the folder written by loc3r-export --out")
    if data.get("version") != VERSION:
        raise ModelError(
            f"{path} has manifest version {data.get('version')}, this loc3r reads {VERSION}",
            "re-run loc3r-export with this version",
        )
    for key in ("model", "precision", "artifacts", "target"):
        if key not in data:
            raise ModelError(f"{path} lacks the {key!r} section", "re-run loc3r-export")
    check_sections(data, path)
    return Manifest(root, data)


def check_sections(data: dict[str, Any], path: Path) -> None:
    """The sections the runtime reads have the right types (a hand-edited or corrupt file
    fails here with a ModelError, not later with a KeyError or TypeError)."""
    problems = []
    if not isinstance(data["model"], dict) or not isinstance(data["model"].get("checksum"), str):
        problems.append("'model.checksum' is not a string")
    if data["precision"] not in PRECISIONS:
        problems.append(f"precision {data['precision']!r} is not one of {', '.join(PRECISIONS)}")
    if not isinstance(data["target"], dict):
        problems.append("'target' is not an object")
    artifacts = data["artifacts"]
    if not isinstance(artifacts, dict):
        problems.append("'artifacts' is not an object")
    else:
        problems += [f"artifact {name!r} is malformed" for name, entry in artifacts.items() if not _valid_artifact(entry)]
    if data.get("llm") is not None and not _valid_llm(data["llm"]):
        problems.append("the 'llm' section is malformed")
    if problems:
        raise ModelError(f"{path} is corrupt: {problems[0]}", "re-run loc3r-export")


def _valid_artifact(entry: object) -> bool:
    """An artifact names its file and lists its inputs and outputs with names and shapes."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return False
    for key in ("inputs", "outputs"):
        specs = entry.get(key)
        if not isinstance(specs, list):
            return False
        for spec in specs:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("shape"), list):
                return False
    return True


def _valid_llm(entry: object) -> bool:
    """The LLM section names its files and a positive context limit and prefill chunk."""
    if not isinstance(entry, dict):
        return False
    files = [entry.get(part) for part in ("decoder", "embeddings")]
    sizes = [entry.get(key) for key in ("context_tokens", "prefill_chunk_tokens")]
    return all(isinstance(f, dict) and isinstance(f.get("file"), str) for f in files) and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes
    )


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
            found = manifest.input_shape(artifact, tensor)
            if list(found) != list(shape):
                raise ModelError(
                    f"manifest {artifact}.{tensor} has shape {found}, the model needs {shape}",
                    "re-export with loc3r-export for this model",
                )
