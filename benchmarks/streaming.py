"""Streaming runtime benchmark (issue 6): cold vs follow-up vs streamed TTFT, cache, memory.

    python -m loc3r.bench.streaming [--model tiny] [--frames 32] [--out benchmarks/results]

Measured in one run, reported as ratios:
- cold TTFT: question known before the video is touched; decode + encode + prefill + question.
- follow-up TTFT: a second question on the same video (only its own tokens are prefilled).
- streamed TTFT: the video was streamed in (encoded and prefilled) before the question came.
- cached encode: a new process-level pipeline on the same video reads the encoding cache.
- memory: peak RSS while sampling a long high-resolution video vs a short one (bounded
  queues and frame-by-frame decoding keep it flat).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loc3r.bench.presets import resolve_bench_model
from loc3r.fileio import write_json_atomic
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline

SAMPLING = SamplingConfig(max_new_tokens=8)


def ttft_runs(model: str, video: Path, frames: int, cache_dir: Path, repeats: int) -> dict[str, float]:
    """Cold, follow-up and streamed-then-asked TTFT (medians), and the cached re-open's encode."""
    pipeline = Pipeline.from_pretrained(resolve_bench_model(model))
    pipeline.open(video, 2).ask("warm up", sampling=SAMPLING)  # first-call allocations

    first_token: list[float] = []
    start = time.perf_counter()
    session = pipeline.open(video, frames)
    cold = session.ask("Where am I?", sampling=SAMPLING, on_token=lambda _: first_token or first_token.append(time.perf_counter()))
    cold_ttft = first_token[0] - start
    follow = [session.ask(f"What is in front of me? ({i})", sampling=SAMPLING).timings["ttft_s"] for i in range(repeats)]

    streamed = []
    for i in range(repeats):
        pipeline.forget_video()
        fresh = pipeline.open(video, frames)  # frames stream in (and are prefilled) before the question
        streamed.append(fresh.ask(f"Where am I? ({i})", sampling=SAMPLING).timings["ttft_s"])

    cached_pipeline = Pipeline.from_pretrained(resolve_bench_model(model), cache_dir=cache_dir)
    cached_pipeline.open(video, frames)  # fills the cache
    cached_pipeline.forget_video()
    reopen = time.perf_counter()
    hit = cached_pipeline.open(video, frames)
    reopen_s = time.perf_counter() - reopen
    return {
        "cold_ttft_s": cold_ttft,
        "follow_up_ttft_s": statistics.median(follow),
        "streamed_ttft_s": statistics.median(streamed),
        "repeats": repeats,
        "cold_encode_s": cold.timings["encode_3d"] + cold.timings["encode_vision"],
        "cached_encode_s": hit.timer.seconds.get("encode_3d", 0.0) + hit.timer.seconds.get("encode_vision", 0.0),
        "cached_reopen_s": reopen_s,
        "cache_status": hit.report.get("encoding_cache"),
    }


def peak_rss_sampling(video: Path, frames: int) -> float:
    """Peak RSS (MiB) of a fresh process that samples ``frames`` frames of ``video``."""
    code = (
        "import resource, sys\n"
        "from loc3r.runtime.video import iter_frames\n"
        f"n = sum(1 for _ in iter_frames({str(video)!r}, {frames}))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_runs(workdir: Path, frames: int, long_minutes: float, fps: int) -> dict[str, Any]:
    short = write_demo_video(workdir / "short.mp4", num_frames=fps * 10, width=1920, height=1080, fps=fps)
    long = write_demo_video(workdir / "long.mp4", num_frames=int(fps * 60 * long_minutes), width=1920, height=1080, fps=fps)
    return {
        "short": {"seconds": 10, "resolution": "1920x1080", "fps": fps, "peak_rss_mib": peak_rss_sampling(short, frames)},
        "long": {"seconds": int(60 * long_minutes), "resolution": "1920x1080", "fps": fps, "peak_rss_mib": peak_rss_sampling(long, frames)},
    }


def markdown(result: dict[str, Any]) -> str:
    t, m = result["ttft"], result["memory"]
    lines = [
        "# Streaming runtime benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; model `{result['model']}` (RANDOM weights: timings only), {result['frames']} frames.",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| cold TTFT (decode + encode + prefill + question) | {t['cold_ttft_s']:.3f} s | |",
        f"| follow-up TTFT (median of {t['repeats']}) | {t['follow_up_ttft_s']:.4f} s | |",
        f"| follow-up / cold | {result['ratios']['follow_up_over_cold']:.4f} | <= 0.05 |",
        f"| streamed-then-asked TTFT (median of {t['repeats']}) | {t['streamed_ttft_s']:.4f} s | |",
        f"| streamed / follow-up | {result['ratios']['streamed_over_follow_up']:.2f} | <= 1.2 |",
        f"| encode, cold run | {t['cold_encode_s']:.3f} s | |",
        f"| encode, cached run ({t['cache_status']}) | {t['cached_encode_s']:.3f} s | ~0 |",
        f"| peak RSS sampling {m['short']['seconds']} s of 1080p | {m['short']['peak_rss_mib']:.0f} MiB | |",
        f"| peak RSS sampling {m['long']['seconds']} s of 1080p | {m['long']['peak_rss_mib']:.0f} MiB | flat |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=5, help="fps of the generated 1080p videos")
    parser.add_argument("--repeats", type=int, default=5, help="questions per TTFT median")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        video = write_demo_video(work / "scene.mp4", num_frames=96, width=640, height=480, fps=8)
        ttft = ttft_runs(args.model, video, args.frames, work / "cache", args.repeats)
        memory = memory_runs(work, args.frames, args.long_minutes, args.fps)
    result = {
        "command": " ".join(["python -m loc3r.bench.streaming", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        "model": args.model,
        "frames": args.frames,
        "ttft": ttft,
        "memory": memory,
        "ratios": {
            "follow_up_over_cold": ttft["follow_up_ttft_s"] / ttft["cold_ttft_s"],
            "streamed_over_follow_up": ttft["streamed_ttft_s"] / ttft["follow_up_ttft_s"],
            "long_over_short_rss": memory["long"]["peak_rss_mib"] / memory["short"]["peak_rss_mib"],
        },
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    stem = f"streaming_{args.model}" if args.model in ("tiny", "small") else "streaming"
    write_json_atomic(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
