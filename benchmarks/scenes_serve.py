"""The server with several scenes (``python -m loc3r.bench.scenes_serve``): questions over 4
videos in a seeded random order, with a scene memory that holds 2 scenes' KV, 1, and none
without a scene store (each switch a prefill of the prefix, as before scenes); the
configurations alternate (A B C, C B A, ...), all on one pipeline. Reports the hit rate (a
question whose video was resident or whose KV was in memory), where reclaimed prefixes came
from, p50/p99 time to first token (max_tokens 1), and this process's CPU seconds (server and
clients) and wall seconds over each configuration's timed questions. Random weights: timings only.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOMS = 4
CONFIGS = {"memory holds 2": 2.5, "memory holds 1": 1.5, "no scene memory, no store": 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.scenes_serve")
    parser.add_argument("--model", default="small")
    parser.add_argument("--questions", type=int, default=24, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    from loc3r.bench.provenance import start

    command = ["python", "-m", "loc3r.bench.scenes_serve", *(sys.argv[1:] if argv is None else argv)]
    stem = Path(args.json_out).stem if args.json_out else f"scenes_serve_{args.model}"
    recording = start(stem, command, "the three configurations in turn, the order reversed every round (A B C, C B A, ...)",
                      args.rounds, args.allow_unreachable)
    from loc3r.bench.presets import resolve_bench_model
    from loc3r.bench.report import machine_info
    from loc3r.runtime.demo_video import write_demo_video
    from loc3r.runtime.pipeline import Pipeline
    from loc3r.serve.server import build_server, running
    from loc3r.serve.settings import ServeSettings

    model = resolve_bench_model(args.model)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="loc3r-bench-serve-scenes-") as tmp:
        media = Path(tmp) / "media"
        rooms = [write_demo_video(media / f"room{i}.mp4", num_frames=40 + i, width=320, height=240).name for i in range(ROOMS)]
        pipeline = Pipeline.from_pretrained(model, cache_dir=Path(tmp) / "cache")
        store = pipeline.scenes
        scene_bytes = pipeline.open(media / rooms[0]).scene().nbytes
        for room in rooms[1:]:
            pipeline.forget_video()
            pipeline.open(media / room)  # every scene stored once, before any timing
        pipeline.forget_video()
        order = random.Random(0).choices(rooms, k=args.questions)
        results: dict[str, Any] = {name: {"ttft_s": [], "hits": 0, "questions": 0, "sources": {}, "cpu_s": [], "wall_s": []}
                                   for name in CONFIGS}
        for i in range(args.rounds):
            for name, scenes in list(CONFIGS.items()) if i % 2 == 0 else list(CONFIGS.items())[::-1]:
                pipeline.scenes = store if scenes else None
                settings = ServeSettings(media_dir=media, upload_dir=Path(tmp) / "uploads", scene_memory_bytes=int(scenes * scene_bytes),
                                         max_new_tokens=4)
                with running(build_server(pipeline, settings)) as url:
                    for room in rooms:  # each server opens the 4 videos once (from the encoding cache), untimed
                        ask(url, room)
                    cpu, wall = time.process_time(), time.perf_counter()
                    for room in order:
                        server = ask(url, room)
                        entry = results[name]
                        entry["ttft_s"].append(server["ttft_s"])
                        entry["questions"] += 1
                        source = server.get("scene_source", server["session"])
                        entry["sources"][source] = entry["sources"].get(source, 0) + 1
                        entry["hits"] += source in ("kept", "memory")
                    results[name]["cpu_s"].append(time.process_time() - cpu)
                    results[name]["wall_s"].append(time.perf_counter() - wall)
                pipeline.forget_video()
        pipeline.scenes = store
    summary = {name: {"hit_rate": r["hits"] / r["questions"], "sources": r["sources"], "questions": r["questions"],
                      "ttft_p50_s": float(np.percentile(r["ttft_s"], 50)), "ttft_p99_s": float(np.percentile(r["ttft_s"], 99)),
                      "cpu_s_per_round_median": statistics.median(r["cpu_s"]), "wall_s_per_round_median": statistics.median(r["wall_s"])}
               for name, r in results.items()}
    doc = {"provenance": recording.finish(), "model": args.model, "scene_kv_bytes": scene_bytes, "machine": machine, "order": order,
           "summary": summary, "raw": results}
    text = json.dumps(doc, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def ask(url: str, room: str) -> dict[str, Any]:
    body = {"model": "loc3r", "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": room}}, {"type": "text", "text": "Where am I?"}]}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["loc3r"]["server"]


if __name__ == "__main__":
    sys.exit(main())
