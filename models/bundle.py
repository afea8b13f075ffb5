"""Our on-disk bundle: ``config.json``, ``tokenizer.json`` and safetensors weights.

Weights are one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(the Hugging Face sharding layout). Bundles are written atomically: into a temporary
sibling folder that is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from loc3r.digest import DigestMemo
from loc3r.errors import ModelError
from loc3r.fileio import atomic_directory, recover_interrupted
from loc3r.models.config import Loc3rConfig
from loc3r.models.convert_stream import DTYPE_NAMES, read_safetensors_header
from loc3r.models.loc3r_model import Loc3rModel
from loc3r.models.precision import Precision, choose_precision, weight_stats
from loc3r.models.tokenizer import TextTokenizer

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
        return choose_precision(weight_stats(weight_files(self.path), REBUILD), self.requested)

    @cached_property
    def model(self) -> Loc3rModel:
        return load_weights(self.path, self.config, self.precision.dtype, self.precision.device)

    def load_parts(self, parts: Sequence[str], dtype: torch.dtype | None = None) -> Loc3rModel:
        """A model with only ``parts`` (``camera_encoder``, ``vision``, ``llm``, ``heads``) loaded,
        on the CPU in ``dtype`` (default: :attr:`precision`'s); the rest stays on the meta device."""
        return load_weights(self.path, self.config, dtype or self.precision.dtype, torch.device("cpu"), parts)


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


def load_bundle(bundle_dir: str | Path, dtype: str = "auto") -> Bundle:
    """Open a bundle (config, tokenizer, checksum); weights load when ``model`` is first used,
    in ``dtype`` (``auto``: chosen for this machine, see ``loc3r.models.precision``)."""
    bundle_dir = Path(bundle_dir)
    restored = recover_interrupted(bundle_dir)
    if restored is not None:
        log.warning("restored %s from %s, where a run killed while replacing it had left it", bundle_dir, restored.name)
    config = Loc3rConfig.load(bundle_dir)
    tokenizer = TextTokenizer.from_dir(bundle_dir)
    if tokenizer.largest_id >= config.llm.vocab_size:
        raise ModelError(
            f"{bundle_dir}/tokenizer.json has token id {tokenizer.largest_id} but the LLM's embedding has only "
            f"{config.llm.vocab_size} rows; config.json and tokenizer disagree",
            REBUILD,
        )
    return Bundle(bundle_dir, config, tokenizer, bundle_checksum(bundle_dir), dtype)


def expected_shapes(config: Loc3rConfig) -> dict[str, tuple[int, ...]]:
    """Every bundle tensor's shape for ``config`` (the model is built on the meta device)."""
    with torch.device("meta"):
        model = Loc3rModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_weights(
    bundle_dir: Path,
    config: Loc3rConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    parts: Sequence[str] | None = None,
) -> Loc3rModel:
    """The PyTorch model with the bundle's tensors in ``dtype`` on ``device``, streamed
    tensor by tensor (peak: the model plus one tensor). Every shape is checked against the
    files' headers before any tensor is read, so the config cannot ask for more memory than
    the weights on disk take; missing, unexpected, mis-shaped or mis-typed (an integer
    where the model holds floats) tensors are a ``ModelError``.
    With ``parts``, only tensors under those top-level names are loaded and the rest stays
    on the meta device."""
    files = weight_files(bundle_dir)
    wanted = tuple(f"{part}." for part in parts) if parts is not None else ("",)
    with parameters_on_meta():  # nothing of the weights' size is allocated here
        model = Loc3rModel(config)
    state = {n: t for n, t in model.state_dict().items() if n.startswith(wanted)}
    infos = {n: info for path in files for n, info in read_safetensors_header(path, REBUILD).items() if n.startswith(wanted)}
    check_tensors({n: tuple(t.shape) for n, t in state.items()}, {n: i.shape for n, i in infos.items()}, bundle_dir)
    check_dtypes({n: t.dtype for n, t in state.items()}, {n: i.dtype for n, i in infos.items()}, bundle_dir)
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name in state:
                        tensor = handle.get_tensor(name)
                        cast = dtype if tensor.is_floating_point() else tensor.dtype
                        _assign(model, name, tensor.to(device, cast))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path} is not a readable safetensors file ({exc})", REBUILD) from None
    if torch.device(device).type != "cpu":
        model.to(device)  # the buffers built on the CPU (rotary tables, position ids)
    return model.eval()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer called ``name`` (no copy)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, initialisers do
    nothing) and their buffers as usual (rotary tables, position ids are computed, not stored)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def check_dtypes(expected: Mapping[str, torch.dtype], stored: Mapping[str, torch.dtype], where: Path) -> None:
    """Refuse tensors stored as integers or booleans where the model holds floating-point
    values (or the reverse): their bytes would be read as something else entirely."""
    wrong = [
        f"{name} ({DTYPE_NAMES.get(stored[name], stored[name])}, the model needs {'floating point' if dtype.is_floating_point else dtype})"
        for name, dtype in expected.items()
        if name in stored and (stored[name].is_floating_point != dtype.is_floating_point or not dtype.is_floating_point and stored[name] != dtype)
    ]
    if wrong:
        shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ModelError(f"bundle {where} has {len(wrong)} tensors of the wrong type: {shown}", REBUILD)


def check_tensors(expected: Mapping[str, tuple[int, ...]], loaded: Mapping[str, tuple[int, ...]], where: Path) -> None:
    """Name the first few missing, unexpected or mis-shaped tensors (names -> shapes)."""
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    misshaped = [
        f"{name} {tuple(loaded[name])} != {tuple(shape)}"
        for name, shape in expected.items()
        if name in loaded and tuple(loaded[name]) != tuple(shape)
    ]
    for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ModelError(
                f"bundle {where} has {len(names)} {kind} tensors ({shown}); config.json and weights disagree",
                REBUILD,
            )
