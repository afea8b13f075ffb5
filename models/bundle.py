"""Our on-disk bundle: ``config.json``, ``tokenizer.json`` and safetensors weights.

Weights are one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(the Hugging Face sharding layout). Bundles are written atomically: into a temporary
sibling folder that is renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from loc3r.digest import DigestMemo
from loc3r.errors import ModelError
from loc3r.fileio import recover_interrupted
from loc3r.models.config import Loc3rConfig
from loc3r.models.tokenizer import TextTokenizer

if TYPE_CHECKING:  # PyTorch loads only with the weights (``model``, ``load_parts``, ``precision``)
    import torch

    from loc3r.models.loc3r_model import Loc3rModel
    from loc3r.models.precision import Precision

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
REBUILD = "re-create the bundle with loc3r-convert"
log = logging.getLogger(__name__)
BUNDLE_KIND = "bundle"  # the output-folder kind (loc3r.fileio) of bundles


class Bundle:
    """An opened bundle: config, tokenizer and checksum now; PyTorch weights on first use.

    Backends that run exported graphs never touch ``model``, so a 7B bundle's weights are
    not loaded for them. ``model`` is loaded in :attr:`precision` (device and dtype chosen
    for this machine, or as ``requested``); :meth:`load_parts` loads only some parts.
    """

    def __init__(self, path: Path, config: Loc3rConfig, tokenizer: TextTokenizer, checksum: str, requested: str = "auto") -> None:
        self.path, self.config, self.tokenizer, self.checksum, self.requested = path, config, tokenizer, checksum, requested

    @cached_property
    def precision(self) -> Precision:
        """Device and dtype of :attr:`model`, with the reason (see ``loc3r.models.precision``)."""
        from loc3r.models.precision import choose_precision, weight_stats

        return choose_precision(weight_stats(weight_files(self.path), REBUILD), self.requested)

    @cached_property
    def model(self) -> Loc3rModel:
        from loc3r.models.weights import load_weights

        return load_weights(self.path, self.config, self.precision.dtype, self.precision.device)

    def load_parts(self, parts: Sequence[str], dtype: torch.dtype | None = None) -> Loc3rModel:
        """A model with only ``parts`` (``camera_encoder``, ``vision``, ``llm``, ``heads``) loaded,
        on the CPU in ``dtype`` (default: :attr:`precision`'s); the rest stays on the meta device."""
        from loc3r.models.weights import load_weights

        return load_weights(self.path, self.config, dtype or self.precision.dtype, "cpu", parts)


def weight_files(bundle_dir: Path) -> list[Path]:
    """The bundle's safetensors files, in load order."""
    index = bundle_dir / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted({str(name) for name in weight_map.values()})
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index} is not a valid weight index ({exc})", REBUILD) from None
        missing = [name for name in names if not (bundle_dir / name).is_file()]
        if missing:
            raise ModelError(f"{index} lists {missing[0]}, which is missing", "re-copy the bundle with all its files")
        return [bundle_dir / name for name in names]
    single = bundle_dir / WEIGHTS_FILE
    if single.is_file():
        return [single]
    raise ModelError(f"{bundle_dir} has no {WEIGHTS_FILE}", REBUILD)


def bundle_checksum(bundle_dir: str | Path) -> str:
    """SHA-256 over config.json, tokenizer.json and the weight files (streamed).

    Hashing a 7B bundle takes tens of seconds, so the result is remembered in the user's
    cache, keyed on the files' identities (``loc3r.digest``; never by a file in the bundle).
    """
    bundle_dir = Path(bundle_dir)
    files = [bundle_dir / "config.json", bundle_dir / "tokenizer.json", *weight_files(bundle_dir)]

    def checksum() -> str:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            with path.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    memo = DigestMemo()
    try:
        return memo.remember(files, "bundle-checksum", checksum)
    finally:
        memo.save()


def load_config(bundle_dir: Path) -> Loc3rConfig:
    """The bundle's config, after renaming back a bundle that a run killed while replacing it
    had left aside (``loc3r.fileio.recover_interrupted``)."""
    restored = recover_interrupted(bundle_dir)
    if restored is not None:
        log.warning("restored %s from %s, where a run killed while replacing it had left it", bundle_dir, restored.name)
    return Loc3rConfig.load(bundle_dir)


def load_bundle(bundle_dir: str | Path, dtype: str = "auto") -> Bundle:
    """Open a bundle (config, tokenizer, checksum); weights load when ``model`` is first used,
    in ``dtype`` (``auto``: chosen for this machine, see ``loc3r.models.precision``)."""
    bundle_dir = Path(bundle_dir)
    config = load_config(bundle_dir)
    tokenizer = TextTokenizer.from_dir(bundle_dir)
    if tokenizer.largest_id >= config.llm.vocab_size:
        raise ModelError(
            f"{bundle_dir}/tokenizer.json has token id {tokenizer.largest_id} but the LLM's embedding has only "
            f"{config.llm.vocab_size} rows; config.json and tokenizer disagree",
            REBUILD,
        )
    return Bundle(bundle_dir, config, tokenizer, bundle_checksum(bundle_dir), dtype)
