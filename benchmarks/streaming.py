"""Streaming runtime benchmark: time to first token as the user waits for it, in one run.

    python -m loc3r.bench.streaming [--model tiny|small] [--frames 32] [--repeats 3] [--out benchmarks/results]

Every TTFT is ``Answer.timings["ttft_s"]``: from the question being given to the first token;
beside it ``cpu_s``, the CPU seconds of this process (all its threads) over the same call.
Each repeat runs every scenario in turn, so load drift hits all of them; medians.
- cold: ``Pipeline.ask(video, question)`` on a video it does not hold: decode, encode and
  prefill of the video (streamed: each frame encoded and prefilled as it is decoded), then
  the question;
- reference order: the same call with ``streaming=False`` (decode every frame, encode, one
  causal prefill of the whole prefix), the work without the overlap;
- follow-up: a second question on the held video (only its own tokens are prefilled);
- streamed-then-asked: the video was opened (streamed in) before the question came;
- cached re-open: a new pipeline with the encoding cache on, asked about a video it
  encoded before: hashing the file, reading and checking the entry, prefilling the prefix
  again, then the question: all of it, split by stage;
- memory: peak RSS (the child's ``VmHWM``) of a process sampling the frames of a 10-min and
  of a 10-s 1080p video.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loc3r.bench.decode import write_long_video
from loc3r.bench.memory import child_peak_rss
from loc3r.bench.presets import resolve_bench_model
from loc3r.bench.provenance import header, start
from loc3r.bench.report import machine_info
from loc3r.fileio import atomic_file, write_json_atomic
from loc3r.models.config import LLMConfig
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.encoding_cache import EncodingCache
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline

SAMPLING = SamplingConfig(max_new_tokens=8)
SCENARIOS = ("cold", "reference_order", "follow_up", "streamed_then_asked", "cached_reopen")
SHOWN = ("ttft_s", "cpu_s", "video_s", "question_to_first_token_s", "cache_read", "decode", "preprocess", "encode_3d",
         "encode_vision", "prefill_video", "prefill_question")


def ttft_runs(model_dir: Path, video: Path, frames: int, cache_dir: Path, repeats: int) -> dict[str, Any]:
    """Median timings of each scenario over ``repeats`` (each repeat runs all of them), and
    the length of the video prefix (``prefix_tokens``)."""
    pipeline = Pipeline.from_pretrained(model_dir)
    cached = Pipeline(pipeline.bundle, pipeline.stages, "torch", EncodingCache(cache_dir))
    pipeline.ask(video, "warm up", sampling=SAMPLING, num_frames=2)  # first-call allocations
    cached.ask(video, "fill the cache", sampling=SAMPLING, num_frames=frames)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SCENARIOS}

    def record(name: str, cpu_from: float, answer: Any) -> Any:
        runs[name].append({**answer.timings, "cpu_s": time.process_time() - cpu_from})
        return answer

    for i in range(repeats):
        pipeline.forget_video()
        record("cold", time.process_time(), pipeline.ask(video, f"Where am I? ({i})", sampling=SAMPLING, num_frames=frames))
        record("follow_up", time.process_time(),
               pipeline.ask(video, f"What is in front of me? ({i})", sampling=SAMPLING, num_frames=frames))
        pipeline.forget_video()
        session = pipeline.open(video, frames)  # streamed in before the question comes
        record("streamed_then_asked", time.process_time(), session.ask(f"Where am I? ({i})", sampling=SAMPLING))
        pipeline.forget_video()
        given_at, cpu_from = time.perf_counter(), time.process_time()
        session = pipeline.open(video, frames, streaming=False)
        record("reference_order", cpu_from, session.ask(f"Where am I? ({i})", sampling=SAMPLING, given_at=given_at))
        cached.forget_video()
        hit = record("cached_reopen", time.process_time(), cached.ask(video, f"Where am I? ({i})", sampling=SAMPLING, num_frames=frames))
        if hit.video.get("encoding_cache") != "hit":
            raise RuntimeError("the cached re-open did not hit the encoding cache")
    medians = {name: {key: statistics.median(r.get(key, 0.0) for r in values) for key in SHOWN} for name, values in runs.items()}
    return medians | {"prefix_tokens": pipeline.stages.llm.cached_length}


def kv_megabytes(config: LLMConfig, tokens: int, bytes_per_value: int = 2) -> float:
    """Size of the KV cache of ``tokens`` positions for an LLM config (fp16 by default)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * bytes_per_value / 1e6


SAMPLE = "from loc3r.runtime.video import iter_frames\nimport sys\nn = sum(1 for _ in iter_frames(sys.argv[1], int(sys.argv[2])))"


def memory_runs(workdir: Path, frames: int, long_minutes: float) -> dict[str, Any]:
    """Peak RSS (the child's VmHWM, MiB) and wall time of sampling ``frames`` frames of a
    10-s and of a ``long_minutes`` 1080p30 video in a fresh process."""
    short = write_demo_video(workdir / "short.mp4", 300, 1920, 1080, 30, {"preset": "veryfast"})
    long = write_long_video(workdir / "long.mp4", long_minutes, 250, workdir)
    out = {}
    for name, path, seconds in (("short", short, 10), ("long", long, int(60 * long_minutes))):
        cpu_from = _children_cpu_s()
        peak, wall = child_peak_rss(SAMPLE, [str(path), str(frames)])
        out[name] = {"seconds": seconds, "resolution": "1920x1080", "fps": 30, "peak_rss_mib": peak / 2**20, "wall_s": wall,
                     "cpu_s": _children_cpu_s() - cpu_from}
    return out


def _children_cpu_s() -> float:
    """CPU seconds of the child processes waited for so far."""
    times = os.times()
    return times.children_user + times.children_system


def markdown(result: dict[str, Any]) -> str:
    t, m, r = result["ttft"], result["memory"], result["ratios"]
    lines = [
        "# Streaming runtime benchmark: time to first token as the user waits for it",
        "",
        *header(result["provenance"]),
        f"Model `{result['model']}` (RANDOM weights: timings only), {result['frames']} frames, torch threads "
        f"{result['machine']['torch_threads']}; medians of {result['repeats']} repeats, every scenario in each repeat. "
        "cpu_s: this process's CPU seconds over the same span as ttft_s (streamed_then_asked: the question only).",
        "",
        "| scenario | ttft_s | cpu_s | video_s | question_to_first_token_s | cache_read | decode | encode_3d | encode_vision | prefill_video | prefill_question |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SCENARIOS:
        v = t[name]
        lines.append(f"| {name} | " + " | ".join(f"{v[k]:.3f}" for k in (
            "ttft_s", "cpu_s", "video_s", "question_to_first_token_s", "cache_read", "decode", "encode_3d", "encode_vision",
            "prefill_video", "prefill_question")) + " |")
    lines += [
        "",
        "| ratio | value |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in r.items()),
        "",
        f"Cached re-open, whole: {t['cached_reopen']['ttft_s']:.3f} s = {r['cached_reopen_over_cold']:.1%} of cold; of it, "
        f"hashing + reading the entry {t['cached_reopen']['cache_read']:.3f} s, re-prefilling the prefix "
        f"{t['cached_reopen']['prefill_video']:.3f} s. Caching the prefix KV with the encodings would remove the re-prefill: "
        f"{result['kv_cache']['benchmarked_mb']:.0f} MB per video for this model, {result['kv_cache']['real_7b_fp16_mb']:.0f} MB "
        "(fp16) for the real Qwen2-7B prefix; not done here (see the note below).",
        "",
        "| memory, sampling 32 frames in a fresh process | peak RSS (VmHWM) | wall | CPU |",
        "|---|---|---|---|",
        *(f"| {v['seconds']} s of 1080p30 | {v['peak_rss_mib']:.0f} MiB | {v['wall_s']:.1f} s | {v['cpu_s']:.1f} s |" for v in m.values()),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="repeats per scenario (medians)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    stem = f"streaming_{args.model}" if args.model in ("tiny", "small") else "streaming"
    command = ["python", "-m", "loc3r.bench.streaming", *(argv if argv is not None else sys.argv[1:])]
    recording = start(stem, command, "every scenario in turn within each repeat (cold, follow-up, streamed, reference, cached)",
                      args.repeats, args.allow_unreachable)
    machine = machine_info()
    model_dir = resolve_bench_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        video = write_demo_video(work / "scene.mp4", num_frames=96, width=640, height=480, fps=8)
        ttft = ttft_runs(model_dir, video, args.frames, work / "cache", args.repeats)
        memory = memory_runs(work, args.frames, args.long_minutes)
    config = Pipeline.from_pretrained(model_dir).config.llm
    prefix_tokens = ttft.pop("prefix_tokens")
    result = {
        "provenance": recording.finish(),
        "machine": machine,
        "model": args.model,
        "frames": args.frames,
        "repeats": args.repeats,
        "ttft": ttft,
        "memory": memory,
        "ratios": {
            "follow_up_over_cold": ttft["follow_up"]["ttft_s"] / ttft["cold"]["ttft_s"],
            "streamed_then_asked_over_follow_up": ttft["streamed_then_asked"]["ttft_s"] / ttft["follow_up"]["ttft_s"],
            "cached_reopen_over_cold": ttft["cached_reopen"]["ttft_s"] / ttft["cold"]["ttft_s"],
            "reference_order_over_cold": ttft["reference_order"]["ttft_s"] / ttft["cold"]["ttft_s"],
            "long_over_short_peak_rss": memory["long"]["peak_rss_mib"] / memory["short"]["peak_rss_mib"],
        },
        "kv_cache": {
            "prefix_tokens": prefix_tokens,
            "benchmarked_mb": kv_megabytes(config, prefix_tokens, 4),
            "real_7b_fp16_mb": kv_megabytes(LLMConfig(), prefix_tokens, 2),  # LLMConfig's defaults are Qwen2-7B's
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", result)
    with atomic_file(out / f"{stem}.md") as stream:
        stream.write(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
