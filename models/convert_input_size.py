"""The vision tower's input size, from what a checkpoint states about itself.

The size frames are resized to is a fact of the checkpoint, not of its tensor shapes:
SigLIP-so400m/14 takes 384x384 frames and its stride-14 patch convolution ignores the
last 6 pixels, so ``grid x patch`` (378) is the wrong size. The facts read, all of which
must agree:

- ``preprocessor_config.json`` / ``video_preprocessor_config.json``: the processor's
  ``crop_size`` when it centre-crops, else its ``size``;
- the tower's name (``mm_vision_tower``, e.g. ``google/siglip-so400m-patch14-384``):
  the resolution after ``patchP-``;
- ``vision_config.image_size`` in ``config.json`` (transformers' llava-onevision layout);
- ``--vision-image-size`` given by the user.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loc3r.errors import ModelError
from loc3r.fileio import read_json_object

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
TOWER_NAME_KEYS = ("mm_vision_tower", "vision_tower")
_TOWER_NAME_SIZE = re.compile(r"patch(\d+)-(\d+)(?![0-9])")
_FLAG = "--vision-image-size"


def vision_input_size(
    folder: Path,
    patch: int,
    grid: int | None,
    tower_name: str | None = None,
    config_size: int | None = None,
    given: int | None = None,
) -> int:
    """The side in pixels that frames are resized to before the tower.

    ``patch`` and ``grid`` (patches per side, when known from the position embedding) come
    from the tensors; a stated size must give that grid at that patch size. ``tower_name``
    is the config's tower name, ``config_size`` its ``vision_config.image_size``, ``given``
    the user's ``--vision-image-size``.
    """
    facts = _stated_sizes(folder, patch, tower_name, config_size)
    if given is not None:
        facts[_FLAG] = given
    if not facts:
        raise ModelError(
            f"{folder}: nothing states the vision tower's input size (no {' or '.join(PROCESSOR_FILES)}, "
            f"no 'patchP-SIZE' in the tower name, no vision_config.image_size)",
            f"pass {_FLAG} N (384 for siglip-so400m-patch14-384)",
        )
    if len(set(facts.values())) > 1:
        stated = ", ".join(f"{where} says {size}" for where, size in facts.items())
        raise ModelError(f"{folder}: the vision input size is stated inconsistently ({stated})", "fix the checkpoint's files")
    size = next(iter(facts.values()))
    if grid is not None and size // patch != grid:
        where = next(iter(facts))
        raise ModelError(
            f"{folder}: {where} gives a {size}-pixel input, {size // patch}x{size // patch} patches of {patch}, "
            f"but the tower's position embedding holds {grid}x{grid}",
            "the config and the weights disagree; download the checkpoint again",
        )
    return size


def tower_name(config: dict[str, Any]) -> str | None:
    """The vision tower's name in a LLaVA config (``mm_vision_tower``), if any."""
    return next((str(config[key]) for key in TOWER_NAME_KEYS if isinstance(config.get(key), str)), None)


def _stated_sizes(folder: Path, patch: int, tower: str | None, config_size: int | None) -> dict[str, int]:
    facts: dict[str, int] = {}
    for name in PROCESSOR_FILES:
        path = folder / name
        if path.is_file():
            facts[name] = _processor_size(path)
    if tower is not None and (match := _TOWER_NAME_SIZE.search(tower.rstrip("/").rsplit("/", 1)[-1])):
        named_patch, size = int(match.group(1)), int(match.group(2))
        if named_patch != patch:
            raise ModelError(
                f"{folder}: the vision tower {tower!r} has {named_patch}-pixel patches, the weights {patch}",
                "the config and the weights disagree; download the checkpoint again",
            )
        facts[f"tower name {tower!r}"] = size
    if config_size is not None:
        facts["config.json vision_config.image_size"] = _side(config_size, folder / "config.json")
    return facts


def _processor_size(path: Path) -> int:
    """``crop_size`` when the processor centre-crops, else ``size``."""
    data = read_json_object(path, "download the checkpoint's processor files again")
    key = "crop_size" if data.get("do_center_crop") and data.get("crop_size") is not None else "size"
    if data.get(key) is None:
        raise ModelError(f"{path} has no {key!r}", "download the checkpoint's processor files again")
    return _side(data[key], path, key)


def _side(value: object, path: Path, key: str = "image_size") -> int:
    """One side from an int, ``{"height", "width"}`` (square) or ``{"shortest_edge"}``."""
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise ModelError(
                    f"{path}: {key} is {value['height']}x{value['width']}; the vision path takes square frames",
                    "use a checkpoint whose processor resizes to a square",
                )
            value = value["height"]
        elif "shortest_edge" in value:
            value = value["shortest_edge"]
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelError(f"{path}: {key} {value!r} is not a size in pixels", "download the checkpoint's files again")
    return value
