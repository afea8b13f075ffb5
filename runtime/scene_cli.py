"""``loc3r-scene add|list|rm``: name a video once; its KV prefix is stored, and
``loc3r-run --scene NAME`` (or the server's ``scene``) answers on it at once."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from loc3r.cli_support import ArgumentParser, positive_int, run_cli
from loc3r.errors import InputError
from loc3r.fileio import finite_json
from loc3r.runtime.scenes import NamedScene, check_name, read_scenes, write_scenes

PROG = "loc3r-scene"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Scenes by name: a video encoded once, its KV prefix stored for any number of questions and poses.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="encode VIDEO, store its KV prefix and name it")
    add.add_argument("name")
    add.add_argument("video")
    add.add_argument("--frames", type=positive_int, default=None, help="frames to sample (default: the model's)")
    add.add_argument("--model", default="tiny", help="bundle folder or 'tiny' (as loc3r-run)")
    add.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"])
    add.add_argument("--engines", help="folder written by loc3r-export (onnxruntime / tensorrt)")
    listing = commands.add_parser("list", help="named scenes and their stored KV")
    listing.add_argument("--json", action="store_true", help="one JSON object per scene")
    remove = commands.add_parser("rm", help="forget a name and delete its stored KV")
    remove.add_argument("name")
    return parser


def scene_store():  # noqa: ANN201 - SceneStore
    from loc3r.runtime.pipeline import default_cache_dir
    from loc3r.runtime.scene_store import SceneStore

    return SceneStore(default_cache_dir() / "scenes")


def add(args: argparse.Namespace) -> int:
    check_name(args.name)
    video = Path(args.video).resolve()
    if not video.is_file():
        raise InputError(f"{args.video} is not a file", "pass a video file")
    from loc3r.runtime.pipeline import Pipeline, default_cache_dir

    pipeline = Pipeline.from_pretrained(args.model, backend=args.backend, engines=args.engines, cache_dir=default_cache_dir())
    session = pipeline.open(video, args.frames)
    key = pipeline.scene_key(video, args.frames)
    scenes = read_scenes()
    scenes[args.name] = NamedScene(str(video), args.frames, key)
    write_scenes(scenes)
    stored = pipeline.scenes.path(key)
    size = f"{stored.stat().st_size / 1e6:.1f} MB of KV stored" if stored.is_file() else "KV not stored (see the warning)"
    print(f"scene {args.name}: {video}, {len(session.encoded.blocks)} frames, {pipeline.stages.llm.cached_length} tokens, {size}")
    if pipeline.model_info.warning:
        print(f"NOTE: {pipeline.model_info.warning}")
    return 0


def listing(args: argparse.Namespace) -> int:
    store = scene_store()
    for name, scene in read_scenes().items():
        path = store.path(scene.key) if scene.key else None
        size = path.stat().st_size if path is not None and path.is_file() else None
        if args.json:
            print(finite_json({"name": name, "video": scene.video, "frames": scene.frames, "stored_bytes": size}))
        else:
            stored = f"{size / 1e6:.1f} MB stored" if size is not None else "not stored (recomputed on next use)"
            print(f"{name}\t{scene.video}\t{scene.frames or 'default'} frames\t{stored}")
    if not args.json:
        print(f"store: {store.total_bytes() / 1e6:.1f} MB of {store.budget_bytes / 1e6:.0f} MB ({store.root})", file=sys.stderr)
    return 0


def remove(args: argparse.Namespace) -> int:
    scenes = read_scenes()
    if args.name not in scenes:
        raise InputError(f"no scene named {args.name!r}", "see loc3r-scene list")
    scene = scenes.pop(args.name)
    write_scenes(scenes)
    if scene.key and not any(other.key == scene.key for other in scenes.values()):
        scene_store().remove(scene.key)
    print(f"scene {args.name} removed")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"add": add, "list": listing, "rm": remove}[args.command]
    return run_cli(PROG, lambda: command(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
