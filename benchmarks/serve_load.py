"""Load test of ``loc3r-serve`` on 127.0.0.1: many clients, one model, nothing lost.

    python -m loc3r.bench.serve_load [--model tiny] [--clients 8] [--questions 20] [--videos 4]
                                     [--frames 4] [--max-tokens 8] [--queue 16] [--deadline-s 600]

A server (in this process, on a free loopback port) answers ``clients`` threads, each asking
``questions`` streamed questions with the official ``openai`` client about one of ``videos``
demo videos (so sessions are shared and the LLM cache moves between videos). First one
client asks the same number of questions alone: the baseline of the same run. Recorded:
client-side TTFT (request sent -> first token received), the server's queue wait and TTFT,
p50/p99 of each, the ratios loaded/alone and follow-up/first, 429s, reclaims, and that every
question was answered. The run is bounded: it stops at ``--deadline-s`` whatever happens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loc3r.bench.presets import resolve_bench_model
from loc3r.bench.report import machine_info
from loc3r.fileio import write_json_atomic
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.pipeline import Pipeline
from loc3r.serve.server import build_server, running
from loc3r.serve.settings import ServeSettings

MAX_RETRIES = 100  # 429s tolerated per question before it counts as lost


@dataclass
class Outcome:
    client: int
    video: str
    ttft_s: float | None  # client side; None when the answer was empty (a stop token first)
    total_s: float
    queue_wait_s: float
    server_ttft_s: float
    session: str  # opened | kept | reclaimed
    retries: int


def ask(client: Any, video: str, question: str, frames: int, max_tokens: int, deadline: float) -> tuple[dict[str, Any], float | None, float, int]:
    """One streamed question, retried after 429s; (loc3r field, ttft, total, retries)."""
    import openai

    for retries in range(MAX_RETRIES):
        if time.monotonic() > deadline:
            break
        sent = time.perf_counter()
        first: float | None = None
        extension: dict[str, Any] | None = None
        try:
            stream = client.chat.completions.create(
                model="loc3r", stream=True, max_tokens=max_tokens, extra_body={"loc3r": {"frames": frames}},
                messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": question}]}],
            )
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - sent
                extension = chunk.to_dict().get("loc3r", extension)
        except openai.RateLimitError as exc:
            time.sleep(float(exc.response.headers.get("Retry-After", "1")))
            continue
        if extension is None:
            raise RuntimeError(f"{video}: the stream ended without the loc3r field")
        return extension, first, time.perf_counter() - sent, retries
    raise TimeoutError(f"{video}: not answered before the deadline or after {MAX_RETRIES} retries")


def run_clients(url: str, clients: int, questions: int, videos: list[str], frames: int, max_tokens: int, deadline: float) -> tuple[list[Outcome], list[str]]:
    """``clients`` threads x ``questions`` questions; outcomes and the errors of lost questions."""
    import openai

    outcomes: list[Outcome] = []
    lost: list[str] = []
    lock = threading.Lock()

    def client_loop(number: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        video = videos[number % len(videos)]
        for q in range(questions):
            try:
                extension, ttft, total, retries = ask(client, video, f"What is in front of me? ({number}.{q})", frames, max_tokens, deadline)
            except Exception as exc:  # noqa: BLE001 - a lost question is a result, not a crash
                with lock:
                    lost.append(f"client {number} question {q}: {type(exc).__name__}: {exc}")
                continue
            server = extension["server"]
            with lock:
                outcomes.append(Outcome(number, video, ttft, total, server["queue_wait_s"], server["ttft_s"], server["session"], retries))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return outcomes, lost


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    array = np.asarray(values)
    return {"p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)), "max": float(array.max()), "n": len(values)}


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    follow = [o for o in outcomes if o.session != "opened"]
    return {
        "client_ttft_s": percentiles([o.ttft_s for o in outcomes if o.ttft_s is not None]),
        "server_ttft_s": percentiles([o.server_ttft_s for o in outcomes]),
        "queue_wait_s": percentiles([o.queue_wait_s for o in outcomes]),
        "total_s": percentiles([o.total_s for o in outcomes]),
        "first_question_server_ttft_s": percentiles([o.server_ttft_s for o in outcomes if o.session == "opened"]),
        "follow_up_server_ttft_s": percentiles([o.server_ttft_s for o in follow]),
        "sessions": {kind: sum(o.session == kind for o in outcomes) for kind in ("opened", "kept", "reclaimed")},
        "retries_after_429": sum(o.retries for o in outcomes),
        "empty_answers": sum(o.ttft_s is None for o in outcomes),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def markdown(result: dict[str, Any]) -> str:
    alone, loaded, r = result["alone"], result["loaded"], result["ratios"]

    def row(label: str, key: str) -> str:
        a, b = alone[key], loaded[key]
        cell = lambda s: "n/a" if s["p50"] is None else f"{s['p50'] * 1000:.1f} / {s['p99'] * 1000:.1f}"  # noqa: E731
        return f"| {label} | {cell(a)} | {cell(b)} |"

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    s = result["settings"]
    lines = [
        "# loc3r-serve load test (127.0.0.1)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch threads {result['machine']['torch_threads']}; "
        f"model `{result['model']}` (RANDOM weights: timings only); {s['videos']} videos, {s['frames']} frames, "
        f"{s['max_tokens']} tokens per answer, queue {s['queue']}.",
        "",
        f"Answered {result['answered']} of {result['asked']} questions (lost: {len(result['lost'])}); "
        f"{result['loaded']['retries_after_429']} retries after a 429; wall time {result['loaded_wall_s']:.1f} s with "
        f"{s['clients']} clients ({result['answered'] / result['loaded_wall_s']:.1f} questions/s) vs {result['alone_wall_s']:.1f} s alone.",
        "",
        f"| p50 / p99 (ms) | 1 client x {s['questions']} | {s['clients']} clients x {s['questions']} |",
        "|---|---:|---:|",
        row("client TTFT (sent -> first token)", "client_ttft_s"),
        row("server TTFT (arrival -> first token)", "server_ttft_s"),
        row("queue wait", "queue_wait_s"),
        row("whole answer", "total_s"),
        row("server TTFT, first question on a video", "first_question_server_ttft_s"),
        row("server TTFT, follow-up questions", "follow_up_server_ttft_s"),
        "",
        f"Sessions under load: {loaded['sessions']} (reclaimed: the video's prefix was prefilled again after another video used the LLM cache).",
        "",
        "| ratio | value |",
        "|---|---:|",
        f"| client TTFT p50, loaded / alone | {fmt(r['client_ttft_p50_loaded_over_alone'])} |",
        f"| client TTFT p99, loaded / alone | {fmt(r['client_ttft_p99_loaded_over_alone'])} |",
        f"| server TTFT p50, follow-up / first (alone) | {fmt(r['follow_up_over_first_alone'])} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--questions", type=int, default=20, help="questions per client")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=600, help="stop asking after this many seconds, answered or not")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline_s
    pipeline = Pipeline.from_pretrained(resolve_bench_model(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        media = Path(tmp) / "media"
        videos = [write_demo_video(media / f"scene{i}.mp4", num_frames=24 + 4 * i, width=320, height=240).name for i in range(args.videos)]
        settings = ServeSettings(media_dir=media, upload_dir=Path(tmp) / "uploads", max_frames=args.frames, queue_size=args.queue)
        with running(build_server(pipeline, settings)) as url:
            start = time.perf_counter()
            alone, lost_alone = run_clients(url, 1, args.questions, videos[:1], args.frames, args.max_tokens, deadline)
            alone_wall = time.perf_counter() - start
            start = time.perf_counter()
            loaded, lost = run_clients(url, args.clients, args.questions, videos, args.frames, args.max_tokens, deadline)
            loaded_wall = time.perf_counter() - start
    alone_summary, loaded_summary = summarize(alone), summarize(loaded)
    result = {
        "command": " ".join(["python -m loc3r.bench.serve_load", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "model": args.model,
        "settings": {k: getattr(args, k) for k in ("clients", "questions", "videos", "frames", "max_tokens", "queue", "deadline_s")},
        "asked": args.clients * args.questions,
        "answered": len(loaded),
        "lost": lost,
        "lost_alone": lost_alone,
        "alone_wall_s": alone_wall,
        "loaded_wall_s": loaded_wall,
        "alone": alone_summary,
        "loaded": loaded_summary,
        "ratios": {
            "client_ttft_p50_loaded_over_alone": ratio(loaded_summary["client_ttft_s"]["p50"], alone_summary["client_ttft_s"]["p50"]),
            "client_ttft_p99_loaded_over_alone": ratio(loaded_summary["client_ttft_s"]["p99"], alone_summary["client_ttft_s"]["p99"]),
            "follow_up_over_first_alone": ratio(alone_summary["follow_up_server_ttft_s"]["p50"], alone_summary["first_question_server_ttft_s"]["p50"]),
        },
        "outcomes": [asdict(o) for o in loaded],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve_load_{args.model}" if args.model in ("tiny", "small") else "serve_load"
    write_json_atomic(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0 if not lost and not lost_alone else 1


if __name__ == "__main__":
    sys.exit(main())
