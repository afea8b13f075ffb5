"""Decoding benchmark: 32 sampled frames of a long 1080p video and of a short clip, read
the way the runtime did before seeking and decoder scaling, and the way it does now.

    python -m loc3r.bench.decode [--long-minutes 10] [--short-seconds 10] [--frames 32]
                                 [--keyint 250 60] [--repeats 3] [--out benchmarks/results]

Videos (generated, 1920x1080, 30 fps, H.264 ``veryfast`` with B-frames): a short clip, and
for each ``--keyint`` (keyframe interval; 250 is x264's default, 60 = 2 s is common for
cameras and streaming) a 20-s clip remuxed end to end into a long video (same bitstream
repeated: decoding cost per frame is that of real 1080p30 H.264).

Per video, in one process, alternating which path runs first:
- ``decode``: ``FrameStream(seek=False)`` + RGB of each sampled frame (the previous
  reader) against ``FrameStream()`` (seeking planned by sampling density, non-reference
  pictures skipped), keeping decoded pictures;
- ``inputs``: CUT3R + SigLIP inputs from the RGB frames with PIL (previous) against the
  decoder's scaling (``Frame.resized``);
- ``total``: both. Wall and CPU seconds (``time.process_time``, all threads), medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from loc3r.bench.provenance import Recording, header, start
from loc3r.fileio import atomic_file, write_json_atomic
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.preprocess import cut3r_input, siglip_input
from loc3r.runtime.video import FrameStream

WIDTH, HEIGHT, FPS = 1920, 1080, 30
CLIP_SECONDS = 20
CUT3R_LONG_SIDE, SIGLIP_SIZE = 512, 384


def write_long_video(path: Path, minutes: float, keyint: int, workdir: Path) -> Path:
    """A ``minutes``-long 1080p30 H.264 video: a 20-s clip (keyframe every ``keyint``
    frames) remuxed back to back with shifted timestamps, without re-encoding."""
    clip = write_demo_video(workdir / f"clip_g{keyint}.mp4", CLIP_SECONDS * FPS, WIDTH, HEIGHT, FPS, encoder_options(keyint))
    repeats = max(1, round(minutes * 60 / CLIP_SECONDS))
    with av.open(str(clip)) as source:
        stream = source.streams.video[0]
        packets = [packet for packet in source.demux(stream) if packet.size]
        span = (max(p.pts for p in packets) - min(p.pts for p in packets)) + (packets[1].dts - packets[0].dts)
        with av.open(str(path), "w") as out:
            target = out.add_stream_from_template(stream)
            for k in range(repeats):
                for packet in packets:
                    copy = av.Packet(bytes(packet))
                    copy.pts, copy.dts, copy.time_base = packet.pts + k * span, packet.dts + k * span, packet.time_base
                    copy.is_keyframe = packet.is_keyframe
                    copy.stream = target
                    out.mux(copy)
    clip.unlink()
    return path


def encoder_options(keyint: int) -> dict[str, str]:
    return {"preset": "veryfast", "g": str(keyint)}


def previous_reader(path: Path, frames: int) -> tuple[FrameStream, list]:
    """Sequential decoding + RGB of every sampled frame (what the runtime did before)."""
    stream = FrameStream(path, frames, seek=False)
    return stream, [f.rgb for f in stream]


def current_reader(path: Path, frames: int) -> tuple[FrameStream, list]:
    """Planned decoding (seeks, skipped non-reference pictures), pictures kept."""
    stream = FrameStream(path, frames)
    return stream, list(stream)


def encoder_inputs(images: list) -> tuple[list, float, float]:
    """CUT3R + SigLIP inputs of ``images`` (RGB arrays: PIL; ``Frame``s: decoder scaling)."""
    return _timed(lambda: [(cut3r_input(i, CUT3R_LONG_SIDE), siglip_input([i], SIGLIP_SIZE)) for i in images])


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(path: Path, frames: int, repeats: int) -> dict[str, Any]:
    """Medians of both paths' stages (wall and CPU seconds) and their ratios."""
    runs: dict[str, list[dict[str, float]]] = {"previous": [], "current": []}
    decoded: dict[str, int] = {}
    seeks: dict[str, int] = {}
    inputs: dict[str, list] = {}
    for i in range(repeats):
        order = ["previous", "current"] if i % 2 == 0 else ["current", "previous"]
        for name in order:
            reader = previous_reader if name == "previous" else current_reader
            (stream, images), decode_wall, decode_cpu = _timed(lambda: reader(path, frames))
            inputs[name], inputs_wall, inputs_cpu = encoder_inputs(images)
            decoded[name], seeks[name] = stream.report.decoded_frames, sum(1 for r in stream.reads or [] if r.seek_to)
            runs[name].append({
                "decode_wall_s": decode_wall, "decode_cpu_s": decode_cpu,
                "inputs_wall_s": inputs_wall, "inputs_cpu_s": inputs_cpu,
                "total_wall_s": decode_wall + inputs_wall, "total_cpu_s": decode_cpu + inputs_cpu,
            })
            print(f"{path.name} run {i + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[name][-1].items()), file=sys.stderr)
    medians = {name: {key: statistics.median(r[key] for r in values) for key in values[0]} for name, values in runs.items()}
    return {
        "video": {"file": path.name, "megabytes": round(path.stat().st_size / 1e6, 1), "seeks": seeks["current"],
                  "decoded_frames_previous": decoded["previous"], "decoded_frames_current": decoded["current"]},
        "runs": runs,
        "parity_grey_levels": parity(inputs["previous"], inputs["current"]),
        "median": medians,
        "ratio_previous_over_current": {k: medians["previous"][k] / medians["current"][k] for k in medians["current"]},
        "total_wall_ratio_per_repeat": [p["total_wall_s"] / c["total_wall_s"] for p, c in zip(runs["previous"], runs["current"], strict=True)],
    }


def parity(previous: list, current: list) -> dict[str, dict[str, float]]:
    """|current - previous| of the CUT3R and SigLIP inputs in grey levels (1/127.5 in [-1, 1])."""
    out = {}
    for position, encoder in enumerate(("cut3r", "siglip")):
        levels = torch.cat([(c[position] - p[position]).abs().flatten() for p, c in zip(previous, current, strict=True)]) * 127.5
        out[encoder] = {"mean": float(levels.mean()), "p99": float(np.quantile(levels.numpy(), 0.99)), "max": float(levels.max())}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Decoding: {result['frames']} sampled frames, previous reader vs seeking + decoder scaling",
        "",
        *header(result["provenance"]),
        f"Repeats: {result['repeats']} per path, alternating order; medians. Ratio = previous / current (> 1: faster now); "
        "the total wall ratio's range is over the repeats' pairs.",
        "",
        "| video | seeks | frames decoded (previous -> now) | stage | previous wall | now wall | ratio | previous CPU | now CPU | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in result["videos"]:
        v, med, ratio = entry["video"], entry["median"], entry["ratio_previous_over_current"]
        for stage in ("decode", "inputs", "total"):
            label = f"{v['description']}" if stage == "decode" else ""
            seeks = str(v["seeks"]) if stage == "decode" else ""
            counts = f"{v['decoded_frames_previous']} -> {v['decoded_frames_current']}" if stage == "decode" else ""
            lines.append(
                f"| {label} | {seeks} | {counts} | {stage} | {med['previous'][stage + '_wall_s']:.2f} s | {med['current'][stage + '_wall_s']:.2f} s | "
                f"{ratio[stage + '_wall_s']:.2f}x | {med['previous'][stage + '_cpu_s']:.2f} s | {med['current'][stage + '_cpu_s']:.2f} s | "
                f"{ratio[stage + '_cpu_s']:.2f}x |"
            )
    lines += ["", "Total wall ratio per repeat (min-max): " + "; ".join(
        f"{e['video']['description']}: {min(e['total_wall_ratio_per_repeat']):.2f}x-{max(e['total_wall_ratio_per_repeat']):.2f}x"
        for e in result["videos"]) + "."]
    lines += ["", "Inputs against the previous (PIL) route, grey levels: "
              + "; ".join(f"{e['video']['description']}: " + ", ".join(
                  f"{enc} mean {v['mean']:.2f} p99 {v['p99']:.0f} max {v['max']:.0f}" for enc, v in e["parity_grey_levels"].items())
                  for e in result["videos"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--short-seconds", type=int, default=10)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--keyint", type=int, nargs="+", default=[250, 60], help="keyframe intervals of the long videos")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", help="where the videos are written (default: a temporary folder)")
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    command = ["python", "-m", "loc3r.bench.decode", *(argv if argv is not None else sys.argv[1:])]
    recording = start("decode", command, "previous and current alternate which runs first (A B, B A, ...)",
                          args.repeats, args.allow_unreachable)
    with tempfile.TemporaryDirectory(prefix="loc3r-decode-", dir=args.workdir) as tmp:
        work = Path(tmp)
        videos = [(write_demo_video(work / "short.mp4", args.short_seconds * FPS, WIDTH, HEIGHT, FPS, encoder_options(250)),
                   f"{args.short_seconds} s, 1080p30, keyint 250")]
        for keyint in args.keyint:
            path = write_long_video(work / f"long_g{keyint}.mp4", args.long_minutes, keyint, work)
            videos.append((path, f"{args.long_minutes:g} min, 1080p30, keyint {keyint}"))
        entries = []
        for path, description in videos:
            entry = measure(path, args.frames, args.repeats)
            entry["video"]["description"] = description
            entries.append(entry)
    result = {"provenance": recording.finish(), "frames": args.frames, "repeats": args.repeats, "videos": entries}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "decode.json", result)
    with atomic_file(out / "decode.md") as stream:
        stream.write(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
