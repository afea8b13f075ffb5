"""Scenes by name: ``$LOC3R_HOME/scenes.json`` maps a name to a video (absolute path) and
its frame count, so ``loc3r-run --scene kitchen``, ``loc3r-scene`` and the server's ``scene``
field find the video whose stored KV (``loc3r.runtime.scene_store``) answers at once.

The file is rewritten atomically; a name is letters, digits, ``-``, ``_`` and ``.``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from loc3r.errors import InputError
from loc3r.fileio import atomic_file, read_json_object
from loc3r.models.tiny import loc3r_home

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class NamedScene:
    """A scene's video, frame count (None: the model's) and the scene-store key it was added under."""

    video: str
    frames: int | None = None
    key: str | None = None


def registry_path() -> Path:
    return loc3r_home() / "scenes.json"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InputError(f"{name!r} is not a scene name", "use letters, digits, '-', '_' and '.' (at most 64)")
    return name


def read_scenes(path: Path | None = None) -> dict[str, NamedScene]:
    """Every named scene (none when the file does not exist yet)."""
    path = path or registry_path()
    if not path.exists():
        return {}
    data = read_json_object(path, f"remove or fix {path}")
    try:
        return {check_name(name): NamedScene(str(entry["video"]), entry.get("frames"), entry.get("key")) for name, entry in data.items()}
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"{path} does not describe scenes", f"remove or fix {path}") from None


def find_scene(name: str, path: Path | None = None) -> NamedScene:
    scenes = read_scenes(path)
    if name not in scenes:
        known = ", ".join(sorted(scenes)) or "none yet"
        raise InputError(f"no scene named {name!r} (known: {known})", "add it with loc3r-scene add NAME VIDEO")
    return scenes[name]


def write_scenes(scenes: dict[str, NamedScene], path: Path | None = None) -> None:
    path = path or registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as stream:
        json.dump({name: asdict(scene) for name, scene in sorted(scenes.items())}, stream, indent=1)
