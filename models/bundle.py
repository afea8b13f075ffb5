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
from safetensors import SafetensorError, safe_open
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
    tokenizer = TextTokenizer.from_dir(bundle_dir)
    if tokenizer.largest_id >= config.llm.vocab_size:
        raise ModelError(
            f"{bundle_dir}/tokenizer.json has token id {tokenizer.largest_id} but the LLM's embedding has only "
            f"{config.llm.vocab_size} rows; config.json and tokenizer disagree",
            "re-create the bundle with loc3r-convert",
        )
    return Bundle(bundle_dir, config, tokenizer, bundle_checksum(bundle_dir), dtype)


def expected_shapes(config: Loc3rConfig) -> dict[str, tuple[int, ...]]:
    """Every bundle tensor's shape for ``config`` (the model is built on the meta device)."""
    with torch.device("meta"):
        model = Loc3rModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def stored_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers (no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as stored:
                shapes.update({name: tuple(stored.get_slice(name).get_shape()) for name in stored.keys()})  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path} is not a readable safetensors file ({exc})", "re-create the bundle") from None
    return shapes


def load_weights(bundle_dir: Path, config: Loc3rConfig) -> Loc3rModel:
    """The PyTorch model with the bundle's tensors. Every shape is checked against the files'
    headers before anything is allocated, so the config cannot ask for more memory than the
    weights on disk take; missing, unexpected or mis-shaped tensors are a ``ModelError``."""
    files = weight_files(bundle_dir)
    check_shapes(expected_shapes(config), stored_shapes(files), bundle_dir)
    model = Loc3rModel(config)
    loaded: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            loaded.update(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path} is not a readable safetensors file ({exc})", "re-create the bundle") from None
    model.load_state_dict(loaded, strict=True)
    return model.eval()


def check_shapes(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], where: Path) -> None:
    """Name the first few missing, unexpected or mis-shaped tensors."""
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    misshaped = [
        f"{name} {stored[name]} != {shape}" for name, shape in expected.items() if name in stored and stored[name] != shape
    ]
    for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ModelError(
                f"bundle {where} has {len(names)} {kind} tensors ({shown}); config.json and weights disagree",
                "re-create the bundle with loc3r-convert",
            )
