"""Load test of ``loc3r-serve`` on 127.0.0.1: many clients, one model, nothing lost.

    python -m loc3r.bench.serve_load [--model tiny] [--clients 8] [--questions 20] [--videos 4]
                                     [--frames 4] [--max-tokens 8] [--queue 16] [--rounds 3] [--deadline-s 900]

A server (in this process, on a free loopback port) answers ``clients`` threads, each asking
``questions`` streamed questions with the official ``openai`` client about one of ``videos``
demo videos (so sessions are shared and the LLM cache moves between videos). Baselines of
the same run: one client asking alone, and the same load on a server whose queue is first
come, first served (no preference for the video in the LLM cache). Recorded: client-side
TTFT (request sent -> first token received), the server's queue wait and TTFT, p50/p99 of
each, the ratios, 429s, reclaims, and that every question was answered. ``--rounds`` rounds,
the two policies alternating which goes first (A B, B A, ...); percentiles pool the rounds'
questions, and each ratio's range over the rounds is given beside it. The run is bounded: it
stops asking at ``--deadline-s`` whatever happens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from loc3r.bench.presets import resolve_bench_model
from loc3r.bench.provenance import header, start
from loc3r.bench.report import machine_info
from loc3r.fileio import atomic_file, write_json_atomic
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


def run_clients(
    url: str, clients: int, questions: int, videos: list[str], frames: int, max_tokens: int, deadline: float
) -> tuple[list[Outcome], list[str]]:
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


@dataclass
class Phase:
    """One measured phase: who asked what, and how it went."""

    outcomes: list[Outcome]
    lost: list[str]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        return {
            **summarize(self.outcomes),
            "answered": len(self.outcomes),
            "lost": self.lost,
            "wall_s": self.wall_s,
            "questions_per_s": len(self.outcomes) / self.wall_s if self.wall_s else None,
        }


def pooled(phases: list[Phase]) -> Phase:
    """The rounds of one phase as one: every question, every loss, the summed wall time."""
    return Phase([o for p in phases for o in p.outcomes], [e for p in phases for e in p.lost], sum(p.wall_s for p in phases))


def phase_ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The same-run ratios of one round's (or the pooled) phase summaries."""
    p50 = {name: summary["client_ttft_s"]["p50"] for name, summary in summaries.items()}
    return {
        "follow_up_over_first": ratio(summaries["alone"]["server_ttft_s"]["p50"], summaries["first"]["server_ttft_s"]["p50"]),
        "loaded_over_alone_p50": ratio(p50["cached_first"], p50["alone"]),
        "loaded_over_alone_p99": ratio(summaries["cached_first"]["client_ttft_s"]["p99"], summaries["alone"]["client_ttft_s"]["p99"]),
        "fifo_over_cached_first_p50": ratio(p50["fifo"], p50["cached_first"]),
        "throughput_cached_first_over_fifo": ratio(summaries["cached_first"]["questions_per_s"], summaries["fifo"]["questions_per_s"]),
    }


def measure(url: str, clients: int, questions: int, videos: list[str], args: argparse.Namespace, deadline: float) -> Phase:
    start = time.perf_counter()
    outcomes, lost = run_clients(url, clients, questions, videos, args.frames, args.max_tokens, deadline)
    return Phase(outcomes, lost, time.perf_counter() - start)


def first_questions(url: str, videos: list[str], args: argparse.Namespace, deadline: float) -> Phase:
    """One question per video, one after another: each opens (decodes, encodes) its video."""
    return pooled([measure(url, 1, 1, [video], args, deadline) for video in videos])


COLUMNS = ("first", "alone", "cached_first", "fifo")
HEADINGS = {
    "first": "first question per video",
    "alone": "1 client",
    "cached_first": "{clients} clients, cached video first",
    "fifo": "{clients} clients, first come first served",
}


def markdown(result: dict[str, Any]) -> str:
    phases, r, s = result["phases"], result["ratios"], result["settings"]

    def cell(summary: dict[str, Any], key: str) -> str:
        figures = summary[key]
        return "n/a" if figures["p50"] is None else f"{figures['p50'] * 1000:.1f} / {figures['p99'] * 1000:.1f}"

    def row(label: str, key: str) -> str:
        return f"| {label} | " + " | ".join(cell(phases[c], key) for c in COLUMNS) + " |"

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    def spread(key: str) -> str:
        values = [v for v in result["ratios_per_round"][key] if v is not None]
        return f"{fmt(r[key])} ({fmt(min(values))}-{fmt(max(values))})" if values else fmt(r[key])

    heads = [HEADINGS[c].format(clients=s["clients"]) for c in COLUMNS]
    lines = [
        "# loc3r-serve load test (127.0.0.1)",
        "",
        *header(result["provenance"]),
        f"Torch threads {result['machine']['torch_threads']}; model `{result['model']}` (RANDOM weights: "
        f"timings only); {s['videos']} videos, {s['frames']} frames, {s['max_tokens']} tokens per answer, queue {s['queue']}.",
        "",
        f"Method: {s['rounds']} rounds; in each, one server per queue policy, in this process, the policies alternating "
        "which goes first. Each server first asks one question per video "
        f"(opening it), then, with the cached-video-first policy only, one client asks {s['questions']} questions alone "
        f"(the baseline), then {s['clients']} clients ask {s['questions']} streamed questions each with the `openai` "
        f"client, client i about video i mod {s['videos']}. TTFT on the client: request sent -> first token received.",
        "",
        "| | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(COLUMNS),
        "| questions answered / asked | " + " | ".join(f"{phases[c]['answered']} / {phases[c]['answered'] + len(phases[c]['lost'])}" for c in COLUMNS) + " |",
        "| questions per second | " + " | ".join(fmt(phases[c]["questions_per_s"]) for c in COLUMNS) + " |",
        "| sessions opened / kept / reclaimed | "
        + " | ".join("{opened} / {kept} / {reclaimed}".format(**phases[c]["sessions"]) for c in COLUMNS) + " |",
        "| **p50 / p99 (ms)** | | | | |",
        row("client TTFT", "client_ttft_s"),
        row("server TTFT (arrival -> first token)", "server_ttft_s"),
        row("queue wait", "queue_wait_s"),
        row("whole answer", "total_s"),
        "",
        "Percentiles pool every round's questions.",
        "",
        "| ratio (same run) | pooled (range over rounds) |",
        "|---|---:|",
        f"| server TTFT p50, follow-up (1 client) / first question | {spread('follow_up_over_first')} |",
        f"| client TTFT p50, {s['clients']} clients / 1 client | {spread('loaded_over_alone_p50')} |",
        f"| client TTFT p99, {s['clients']} clients / 1 client | {spread('loaded_over_alone_p99')} |",
        f"| client TTFT p50, first come first served / cached video first | {spread('fifo_over_cached_first_p50')} |",
        f"| questions per second, cached video first / first come first served | {spread('throughput_cached_first_over_fifo')} |",
        "",
        f"Lost questions: {sum(len(phases[c]['lost']) for c in COLUMNS)}; retries after a 429: "
        f"{sum(phases[c]['retries_after_429'] for c in COLUMNS)}.",
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
    parser.add_argument("--deadline-s", type=float, default=900, help="stop asking after this many seconds, answered or not")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the policies alternating which goes first (default 3)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    stem = f"serve_load_{args.model}" if args.model in ("tiny", "small") else "serve_load"
    command = ["python", "-m", "loc3r.bench.serve_load", *(argv if argv is not None else sys.argv[1:])]
    recording = start(stem, command, "the two queue policies alternate which goes first every round (A B, B A, ...)",
                      args.rounds, args.allow_unreachable)
    deadline = time.monotonic() + args.deadline_s
    pipeline = Pipeline.from_pretrained(resolve_bench_model(args.model))
    rounds: list[dict[str, Phase]] = []
    with tempfile.TemporaryDirectory() as tmp:
        media = Path(tmp) / "media"
        videos = [write_demo_video(media / f"scene{i}.mp4", num_frames=24 + 4 * i, width=320, height=240).name for i in range(args.videos)]
        settings = ServeSettings(media_dir=media, upload_dir=Path(tmp) / "uploads", max_frames=args.frames, queue_size=args.queue)
        policies = [("cached_first", settings.max_passes), ("fifo", 0)]
        for i in range(args.rounds):
            phases: dict[str, Phase] = {}
            for policy, passes in policies if i % 2 == 0 else policies[::-1]:
                with running(build_server(pipeline, replace(settings, max_passes=passes))) as url:
                    opened = first_questions(url, videos, args, deadline)
                    if policy == "cached_first":
                        phases["first"] = opened
                        phases["alone"] = measure(url, 1, args.questions, videos[:1], args, deadline)
                    phases[policy] = measure(url, args.clients, args.questions, videos, args, deadline)
            rounds.append(phases)
    summaries = {name: pooled([r[name] for r in rounds]).summary() for name in COLUMNS}
    per_round = [phase_ratios({name: phase.summary() for name, phase in r.items()}) for r in rounds]
    result = {
        "provenance": recording.finish(),
        "machine": machine_info(),
        "model": args.model,
        "settings": {k: getattr(args, k) for k in ("clients", "questions", "videos", "frames", "max_tokens", "queue", "rounds", "deadline_s")},
        "phases": summaries,
        "ratios": phase_ratios(summaries),
        "ratios_per_round": {key: [r[key] for r in per_round] for key in per_round[0]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", result)
    with atomic_file(out / f"{stem}.md") as stream:
        stream.write(markdown(result))
    print(markdown(result))
    return 1 if any(phase["lost"] for phase in summaries.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
