"""Read (and, for tests, write) official CUT3R ``.pth`` checkpoints without the reference code.

The official file is ``torch.save({"model": state_dict, "args": args})`` where ``args`` is an
OmegaConf or argparse object whose ``model`` field is the constructor line, e.g.
``ARCroco3DStereo(ARCroco3DStereoConfig(state_size=768, ..., dec_num_heads=12))``.
Sizes come from tensor shapes; only head counts, ``state_pe``, the RoPE frequency, the
training size and head type come from that line (reference defaults when it is absent).
The file is read with a restricted unpickler: tensors, plain containers and
``argparse.Namespace`` are rebuilt, any other class becomes an inert placeholder.
"""

from __future__ import annotations

import argparse
import ast
import logging
import pickle
import re
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loc3r.errors import ModelError
from loc3r.models.cut3r.config import Cut3rConfig
from loc3r.models.cut3r.encoder import Cut3rCameraEncoder

log = logging.getLogger(__name__)

_ALLOWED = {("collections", "OrderedDict"), ("argparse", "Namespace"),
            ("torch._tensor", "_rebuild_from_type_v2"), ("torch.nn.parameter", "Parameter")}
_FIX = "pass an official CUT3R checkpoint such as cut3r_512_dpt_4_64.pth"
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "object", "int", "float", "str",
             "bool", "bytes", "bytearray", "complex", "slice"}


class _Opaque:
    """Stand-in for a class we do not import (OmegaConf nodes, typing objects, ...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("values", []).extend(values)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or name.endswith("Storage")
                                  or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        return _Opaque


_restricted_pickle = types.ModuleType("loc3r_restricted_pickle")
_restricted_pickle.Unpickler = _Unpickler
_restricted_pickle.load = lambda f, **kw: _Unpickler(f, **kw).load()


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"CUT3R checkpoint {path} does not exist", _FIX)
    with path.open("rb") as f:
        head = f.read(4)
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle, mmap=head == b"PK\x03\x04")
    except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError, ...
        if head == b"PK\x03\x04":
            raise ModelError(
                f"{path} is a truncated or corrupt PyTorch checkpoint ({type(exc).__name__})",
                f"download it again or {_FIX}",
            ) from exc
        raise ModelError(f"{path} is not a PyTorch checkpoint", _FIX) from exc


def _state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ModelError(f"{path} holds no model state dict", _FIX)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _find_model_line(obj: Any, depth: int = 0) -> str | None:
    """The ``ARCroco3DStereo(...)`` string anywhere inside ``args`` (str, Namespace, OmegaConf)."""
    if depth > 20:
        return None
    if isinstance(obj, str):
        return obj if "ARCroco3DStereoConfig(" in obj else None
    if isinstance(obj, dict):
        children: Any = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = obj
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return None
    for child in children:
        found = _find_model_line(child, depth + 1)
        if found:
            return found
    return None


def parse_model_line(line: str) -> dict[str, Any]:
    """Literal keyword arguments of ``ARCroco3DStereoConfig(...)`` in a model line."""
    try:
        tree = ast.parse(line.strip(), mode="eval")
    except SyntaxError:
        return {}
    out: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ARCroco3DStereoConfig":
            for kw in node.keywords:
                try:
                    out[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    continue  # e.g. depth_mode=('exp', -inf, inf): not needed here
    return out


def _count(sd: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def infer_config(sd: dict[str, Tensor], args: dict[str, Any]) -> Cut3rConfig:
    """Sizes from tensor shapes; head counts and options from the parsed model line."""
    enc, _, patch, _ = sd["patch_embed.proj.weight"].shape
    dec = sd["decoder_embed.weight"].shape[0]
    defaults = {"enc_num_heads": enc // 64, "dec_num_heads": dec // 64, "state_dec_num_heads": 16,
                "state_pe": "2d", "pos_embed": "RoPE100", "img_size": (512, 512)}
    guessed = sorted(set(defaults) - set(args))
    if guessed:
        log.warning("CUT3R checkpoint args do not give %s; using reference defaults", guessed)
    a = {**defaults, **args}
    if not str(a["pos_embed"]).startswith("RoPE"):
        raise ModelError(f"CUT3R pos_embed {a['pos_embed']!r} is not supported", "only RoPE models")
    img_size = a["img_size"]
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    head_type = a.get("head_type") or (
        "dpt" if any(k.startswith("downstream_head.dpt") for k in sd) else "linear")
    return Cut3rConfig(
        enc_embed_dim=enc,
        enc_depth=_count(sd, "enc_blocks"),
        enc_num_heads=int(a["enc_num_heads"]),
        dec_embed_dim=dec,
        dec_depth=_count(sd, "dec_blocks"),
        dec_num_heads=int(a["dec_num_heads"]),
        state_size=sd["register_tokens.weight"].shape[0],
        state_dec_num_heads=int(a["state_dec_num_heads"]),
        state_pe=a["state_pe"],
        local_mem_size=sd["pose_retriever.mem"].shape[1],
        mem_depth=_count(sd, "pose_retriever.write_blocks"),
        patch_size=patch,
        rope_freq=float(str(a["pos_embed"])[len("RoPE"):]),
        mlp_ratio=sd["enc_blocks.0.mlp.fc1.weight"].shape[0] / enc,
        img_size=img_size,
        head_type=str(head_type),
    )


def _check_kind(sd: dict[str, Tensor], path: Path) -> None:
    if "register_tokens.weight" in sd and "pose_retriever.mem" in sd:
        return
    if any(k.startswith(("dec_blocks2.", "downstream_head1.")) for k in sd):
        raise ModelError(
            f"{path} is a DUSt3R/MASt3R checkpoint (two decoders, no CUT3R state tokens)", _FIX)
    raise ModelError(f"{path} is not a CUT3R checkpoint (no state tokens or pose memory)", _FIX)


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")


def load_cut3r(path: str | Path) -> Cut3rCameraEncoder:
    """Official CUT3R ``.pth`` -> camera encoder in eval mode; unneeded keys are skipped.

    The skipped keys (heads, ray-map encoder, masked tokens, ...) are logged at INFO and
    kept in ``model.skipped_keys``. float32 parameters stay memory-mapped from the file
    (copy-on-write), which halves peak memory: do not rewrite the file while the model lives.
    """
    path = Path(path)
    obj = _read(path)
    sd = _state_dict(obj, path)
    _check_kind(sd, path)
    line = _find_model_line(obj.get("args")) if isinstance(obj, dict) else None
    try:
        config = infer_config(sd, parse_model_line(line) if line else {})
    except KeyError as exc:
        raise ModelError(f"{path} lacks CUT3R tensor {exc.args[0]!r}", _FIX) from exc
    with torch.device("meta"):  # no init: every parameter comes from the checkpoint
        model = Cut3rCameraEncoder(config)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(sd))
    bad_shape = sorted(k for k in set(wanted) & set(sd) if sd[k].shape != wanted[k].shape)
    if missing or bad_shape:
        problems = []
        if missing:
            problems.append(f"missing {_names(missing)}")
        if bad_shape:
            problems.append(f"mis-shaped {_names(bad_shape)}")
        raise ModelError(f"{path} does not fit the CUT3R camera encoder: {'; '.join(problems)}",
                         _FIX)
    model.load_state_dict({k: sd[k].float() for k in wanted}, strict=True, assign=True)
    model.skipped_keys = tuple(sorted(set(sd) - set(wanted)))
    log.info("loaded CUT3R %s; skipped %d unneeded keys: %s", path, len(model.skipped_keys),
             _names(list(model.skipped_keys)))
    return model.eval()


def official_model_line(config: Cut3rConfig) -> str:
    """The reference constructor line for ``config`` (as in config/*.yaml ``model:``)."""
    c = config
    return (
        "ARCroco3DStereo(ARCroco3DStereoConfig(freeze='encoder', "
        f"state_size={c.state_size}, state_pe='{c.state_pe}', pos_embed='RoPE{c.rope_freq:g}', "
        "rgb_head=True, pose_head=True, patch_embed_cls='ManyAR_PatchEmbed', "
        f"img_size={tuple(c.img_size)}, head_type='{c.head_type}', output_mode='pts3d+pose', "
        "depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), pose_mode=('exp', -inf, inf), "
        f"enc_embed_dim={c.enc_embed_dim}, enc_depth={c.enc_depth}, "
        f"enc_num_heads={c.enc_num_heads}, dec_embed_dim={c.dec_embed_dim}, "
        f"dec_depth={c.dec_depth}, dec_num_heads={c.dec_num_heads}, "
        f"state_dec_num_heads={c.state_dec_num_heads}, local_mem_size={c.local_mem_size}, "
        f"mlp_ratio={c.mlp_ratio:g}, patch_size={c.patch_size}, landscape_only=False))"
    )


def save_official_checkpoint(
    state_dict: dict[str, Tensor], args_str: str, path: str | Path
) -> None:
    """Write ``{"model": ..., "args": Namespace(model=args_str)}`` like the official files.

    Adds keys the camera path does not need (a fake ``downstream_head`` tensor and a
    ``mask_token``) so that loaders exercise their skip path.
    """
    dim = state_dict["decoder_embed.weight"].shape[0]
    model = {
        **state_dict,
        "mask_token": torch.zeros(1, 1, dim),
        "downstream_head.proj.weight": torch.zeros(4, dim),
    }
    torch.save({"model": model, "args": argparse.Namespace(model=args_str)}, path)
