"""``loc3r-run``'s checks of its model, exported artifacts and video, done before anything
heavy loads (torch, transformers, ONNX Runtime sessions, weights): a mistake is answered in
about a second, not after the model has loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loc3r.errors import InputError
from loc3r.export.manifest import Manifest, load_manifest
from loc3r.models.bundle import load_config
from loc3r.models.config import Loc3rConfig
from loc3r.models.tiny import BUILTIN
from loc3r.runtime.video import VideoInfo, probe_video


@dataclass(frozen=True)
class Preflight:
    """What the checks read on the way: the bundle's config (None for a built-in model not
    built yet), the export's manifest and the video's stream information."""

    config: Loc3rConfig | None
    manifest: Manifest | None
    video: VideoInfo | None


def preflight(model: str, backend: str, engines: str | None, video: str | None) -> Preflight:
    """Refuse a backend without its ``--engines``, a ``--model`` that is not a bundle (its
    config checked), an ``--engines`` folder without a readable manifest, and a video that
    cannot be read (missing, a still image, no video stream): each a one-line error naming
    the fix. Whether the export is of this model is checked when the pipeline opens it
    (by checksum, still before any session or weight loads)."""
    if backend != "torch" and engines is None:
        raise InputError(f"--backend {backend} needs --engines DIR", "pass the folder written by loc3r-export --out")
    config = None if model in BUILTIN else load_config(Path(model))
    manifest = load_manifest(engines) if engines is not None and backend != "torch" else None
    return Preflight(config, manifest, probe_video(video) if video else None)
