"""Our on-disk bundle: ``config.json``, ``tokenizer.json`` and safetensors weights.

Weights are one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(the Hugging Face sharding layout). Bundles are written atomically: into a temporary
sibling folder that is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loc3r.errors import ModelError
from loc3r.fileio import atomic_directory, write_json_atomic
from loc3r.models.config import Loc3rConfig
from loc3r.models.loc3r_model import Loc3rModel
from loc3r.models.tokenizer import TextTokenizer

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
CHECKSUM_MEMO = ".loc3r-checksum.json"
BUNDLE_KIND = "bundle"  # the output-folder kind (loc3r.fileio) of bundles


class Bundle:
    """An opened bundle: config, tokenizer and checksum now; PyTorch weights on first use.

    Backends that run exported graphs never touch ``model``, so a 7B bundle's weights are
    not loaded for them.
    """

    def __init__(self, path: Path, config: Loc3rConfig, tokenizer: TextTokenizer, checksum: str, dtype: torch.dtype) -> None:
        self.path, self.config, self.tokenizer, self.checksum, self.dtype = path, config, tokenizer, checksum, dtype

    @cached_property
    def model(self) -> Loc3rModel:
        return load_weights(self.path, self.config).to(self.dtype)


def weight_files(bundle_dir: Path) -> list[Path]:
    """The bundle's safetensors files, in load order."""
    index = bundle_dir / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted({str(name) for name in weight_map.values()})
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index} is not a valid weight index ({exc})", "re-create the bundle with loc3r-convert") from None
        missing = [name for name in names if not (bundle_dir / name).is_file()]
        if missing:
            raise ModelError(f"{index} lists {missing[0]}, which is missing", "re-copy the bundle with all its files")
        return [bundle_dir / name for name in names]
    single = bundle_dir / WEIGHTS_FILE
    if single.is_file():
        return [single]
    raise ModelError(f"{bundle_dir} has no {WEIGHTS_FILE}", "re-create the bundle with loc3r-convert")


def bundle_checksum(bundle_dir: str | Path) -> str:
    """SHA-256 over config.json, tokenizer.json and the weight files (streamed).

    Hashing a 7B bundle takes tens of seconds, so the result is remembered in
    ``.loc3r-checksum.json`` beside the files, keyed by their names, sizes and mtimes.
    """
    bundle_dir = Path(bundle_dir)
    files = [bundle_dir / "config.json", bundle_dir / "tokenizer.json", *weight_files(bundle_dir)]
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo = bundle_dir / CHECKSUM_MEMO
    try:
        remembered = json.loads(memo.read_text(encoding="utf-8"))
        if remembered["files"] == stamp:
            return remembered["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    with contextlib.suppress(OSError):  # a read-only bundle simply is not memoised
        write_json_atomic(memo, {"files": stamp, "sha256": digest.hexdigest()})
    return digest.hexdigest()


def save_bundle(model: Loc3rModel, tokenizer: TextTokenizer, out_dir: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` as a bundle at ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, BUNDLE_KIND) as staging:
        (staging / "config.json").write_text(
            json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8"
        )
        tokenizer.save(staging)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


def load_bundle(bundle_dir: str | Path, dtype: torch.dtype = torch.float32) -> Bundle:
    """Open a bundle (config, tokenizer, checksum); weights load when ``model`` is first used."""
    bundle_dir = Path(bundle_dir)
    config = Loc3rConfig.load(bundle_dir)
    return Bundle(bundle_dir, config, TextTokenizer.from_dir(bundle_dir), bundle_checksum(bundle_dir), dtype)


def load_weights(bundle_dir: Path, config: Loc3rConfig) -> Loc3rModel:
    """The PyTorch model with the bundle's tensors; missing/unexpected/mis-shaped ones are an error."""
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
    return model.eval()


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
