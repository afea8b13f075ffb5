"""The bundle's weights in PyTorch: writing a bundle, loading its tensors into the model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from loc3r.errors import ModelError
from loc3r.fileio import atomic_directory
from loc3r.models.bundle import BUNDLE_KIND, REBUILD, WEIGHTS_FILE, weight_files
from loc3r.models.config import Loc3rConfig
from loc3r.models.convert_stream import DTYPE_NAMES, read_safetensors_header
from loc3r.models.loc3r_model import Loc3rModel
from loc3r.models.tokenizer import TextTokenizer


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
