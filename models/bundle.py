"""Our on-disk bundle: ``config.json``, ``tokenizer.json`` and safetensors weights.

Weights are one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(the Hugging Face sharding layout). Bundles are written atomically: into a temporary
sibling folder that is renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loc3r.errors import ModelError
from loc3r.fileio import atomic_directory
from loc3r.models.config import Loc3rConfig
from loc3r.models.loc3r_model import Loc3rModel
from loc3r.models.tokenizer import TextTokenizer

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Bundle:
    """A loaded bundle: what the runtime needs to build its stages."""

    path: Path
    config: Loc3rConfig
    tokenizer: TextTokenizer
    model: Loc3rModel
    checksum: str


def weight_files(bundle_dir: Path) -> list[Path]:
    """The bundle's safetensors files, in load order."""
    index = bundle_dir / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [bundle_dir / name for name in sorted(set(weight_map.values()))]
    single = bundle_dir / WEIGHTS_FILE
    if single.is_file():
        return [single]
    raise ModelError(f"{bundle_dir} has no {WEIGHTS_FILE}", "re-create the bundle with loc3r-convert")


def bundle_checksum(bundle_dir: str | Path) -> str:
    """SHA-256 over config.json, tokenizer.json and the weight files (streamed)."""
    bundle_dir = Path(bundle_dir)
    digest = hashlib.sha256()
    for path in [bundle_dir / "config.json", bundle_dir / "tokenizer.json", *weight_files(bundle_dir)]:
        digest.update(path.name.encode())
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def save_bundle(model: Loc3rModel, tokenizer: TextTokenizer, out_dir: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` as a bundle at ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        (staging / "config.json").write_text(
            json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8"
        )
        tokenizer.save(staging)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


def load_bundle(bundle_dir: str | Path, dtype: torch.dtype = torch.float32) -> Bundle:
    """Load a bundle; missing, unexpected or mis-shaped tensors are a ModelError."""
    bundle_dir = Path(bundle_dir)
    config = Loc3rConfig.load(bundle_dir)
    tokenizer = TextTokenizer.from_dir(bundle_dir)
    model = Loc3rModel(config)
    expected = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for path in weight_files(bundle_dir):
        try:
            loaded.update(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path} is not a readable safetensors file ({exc})", "re-create the bundle") from None
    check_tensors(expected, loaded, bundle_dir)
    model.load_state_dict(loaded, strict=True)
    return Bundle(bundle_dir, config, tokenizer, model.to(dtype), bundle_checksum(bundle_dir))


def check_tensors(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], where: Path) -> None:
    """Name the first few missing, unexpected or mis-shaped tensors."""
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    misshaped = [
        f"{name} {tuple(loaded[name].shape)} != {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in loaded and loaded[name].shape != tensor.shape
    ]
    for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ModelError(
                f"bundle {where} has {len(names)} {kind} tensors ({shown}); config.json and weights disagree",
                "re-create the bundle with loc3r-convert",
            )
