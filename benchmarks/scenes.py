"""Scene memory and pose-only localization, measured (``python -m loc3r.bench.scenes``).

- re-open of a stored scene in a NEW process (question given with the video: time to first
  token includes hashing the file, reading and verifying the encoding entry and the KV, and
  copying the KV in) vs a follow-up on the video that process then holds; fresh processes;
- loading the stored KV vs recomputing the prefix (encoding-cache hit + prefill), alternated;
- ``locate`` (pose only) per situation vs a full question (same suffix + question, answer decoded);
- batched situations/s at batch 1, 8, 32 vs the same situations one at a time, alternated;
- int8 per-channel scenes: size, and the pose and logits they give vs the LLM's dtype;
- store size per video: measured here, and at the real size by the same token count.

Wall seconds beside process CPU seconds; the load average before and after. Random weights:
timings only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SITUATION = "I am standing by the kitchen sink, the fridge is on my left and the window behind me."
QUESTION = "What is directly in front of me?"
SITUATIONS = [f"{SITUATION} Variant {i}: I face the {('door', 'table', 'bed', 'sofa')[i % 4]}." for i in range(32)]
VIDEO = {"num_frames": 96, "width": 640, "height": 480, "fps": 8}


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall s, process CPU s)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def child_reopen(model: str, video: str, cache: str, warm: bool) -> dict[str, float]:
    """In a fresh process: the question given with a stored video, then a follow-up.
    ``warm``: the LLM has run once before (a short prefill, as in a process that already
    answered), so the first question does not also pay for the first forward pass."""
    from loc3r.runtime.generate import SamplingConfig
    from loc3r.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_pretrained(model, cache_dir=cache)
    if warm:
        llm = pipeline.stages.llm
        llm.prefill(llm.embed(list(range(1, 64))))
        llm.reset()
    sampling = SamplingConfig(max_new_tokens=1)
    cpu = time.process_time()
    first = pipeline.ask(video, QUESTION, SITUATION, sampling)
    first_cpu = time.process_time() - cpu
    cpu = time.process_time()
    follow = pipeline.ask(video, QUESTION, SITUATION, sampling)
    follow_cpu = time.process_time() - cpu
    assert first.video.get("scene") == "loaded", first.video
    return {"reopen_ttft_s": first.timings["ttft_s"], "reopen_cpu_s": first_cpu, "scene_load_s": first.timings.get("scene_load", 0.0),
            "cache_read_s": first.timings.get("cache_read", 0.0), "follow_up_ttft_s": follow.timings["ttft_s"], "follow_up_cpu_s": follow_cpu}


def in_process(model: str, video: str, cache: str, rounds: int) -> dict[str, Any]:
    """KV load vs recompute, pose-only vs a full question, batching, int8 effect, sizes."""
    from loc3r.bench.flops import kv_bytes_per_token
    from loc3r.models.config import LLMConfig
    from loc3r.runtime.generate import SamplingConfig
    from loc3r.runtime.pipeline import Pipeline
    from loc3r.runtime.scene_store import KVLayout, SceneStore

    pipeline = Pipeline.from_pretrained(model, cache_dir=cache)
    store = pipeline.scenes
    first, cold_wall, cold_cpu = timed(lambda: pipeline.open(video))  # encodes and stores the scene
    assert first.report.get("scene") == "stored", first.report
    out: dict[str, Any] = {"cold_open": cold_wall, "cold_open_cpu": cold_cpu, "scene_store_s": first.timer.seconds.get("scene_store"),
                           "load": [], "recompute": [], "load_cpu": [], "recompute_cpu": []}
    for _ in range(rounds):  # A B A B: the stored KV, then the prefix recomputed from the encoding entry
        for name, scenes in (("load", store), ("recompute", None)):
            pipeline.forget_video()
            pipeline.scenes = scenes
            session, wall, cpu = timed(lambda: pipeline.open(video))
            assert session.report.get("scene") == ("loaded" if scenes else None), session.report
            out[name].append(wall)
            out[f"{name}_cpu"].append(cpu)
    pipeline.scenes = store
    llm = pipeline.stages.llm
    prefix_tokens = llm.cached_length
    full_sampling = SamplingConfig(max_new_tokens=16)
    pose, full, full_ttft, full_tokens, pose_cpu, full_cpu = [], [], [], [], [], []
    for _ in range(rounds):
        _, wall, cpu = timed(lambda: session.locate([SITUATION]))
        pose.append(wall)
        pose_cpu.append(cpu)
        answer, wall, cpu = timed(lambda: session.ask(QUESTION, SITUATION, full_sampling))
        full.append(wall)
        full_cpu.append(cpu)
        full_ttft.append(answer.timings["ttft_s"])
        full_tokens.append(len(answer.token_ids))
    out |= {"pose_only": pose, "pose_only_cpu": pose_cpu, "full_question": full, "full_question_cpu": full_cpu,
            "full_question_ttft": full_ttft, "full_question_tokens": full_tokens}
    batching: dict[str, Any] = {}
    for batch in (1, 8, 32):
        batched, alone = [], []
        for _ in range(rounds):
            _, wall, _ = timed(lambda: session.locate(SITUATIONS[:batch]))
            batched.append(batch / wall)
            _, wall, _ = timed(lambda: [session.locate([s]) for s in SITUATIONS[:batch]])
            alone.append(batch / wall)
        batching[str(batch)] = {"batched_per_s": summary(batched), "one_at_a_time_per_s": summary(alone)}
    out["batching"] = batching
    out["prefix_tokens"] = prefix_tokens
    out |= int8_effect(pipeline, session, store, KVLayout(*llm.kv_layout), SceneStore)
    real = LLMConfig()
    out["real_size_fp16_bytes"] = kv_bytes_per_token(real, 2.0) * prefix_tokens
    out["real_size_int8_bytes"] = kv_bytes_per_token(real, 1.0) * prefix_tokens + 2 * real.num_hidden_layers * real.num_key_value_heads * 128 * 4
    out["kv_dtype"] = llm.kv_dtype
    return out


def int8_effect(pipeline, session, store, layout, scene_store_class) -> dict[str, Any]:  # noqa: ANN001
    """Stored sizes, and pose / next-token logits with an int8 scene vs the LLM's dtype."""
    from loc3r.models.prompt import build_question_suffix

    key = pipeline.scene_key(session.source)
    int8_store = scene_store_class(store.root.parent / "scenes-int8", compression="int8")
    int8_store.store(key, session.scene())
    exact, packed = store.load(key, layout), int8_store.load(key, layout)
    llm, tokenizer = pipeline.stages.llm, pipeline.bundle.tokenizer
    results = {}
    for name, scene in (("exact", exact), ("int8", packed)):
        session.reclaim_cache(scene)
        poses = session.locate(SITUATIONS[:8])
        suffix = build_question_suffix(tokenizer, QUESTION, SITUATION)
        logits = llm.prefill(llm.embed(suffix.ids)).last_logits.float().numpy()
        llm.truncate(scene.length)
        results[name] = (poses, logits)
    session.reclaim_cache(exact)
    (poses_a, logits_a), (poses_b, logits_b) = results["exact"], results["int8"]
    return {
        "stored_bytes": store.path(key).stat().st_size,
        "stored_int8_bytes": int8_store.path(key).stat().st_size,
        "int8_position_max_abs_m": max(max(abs(a.x - b.x), abs(a.y - b.y)) for a, b in zip(poses_a, poses_b)),
        "int8_sigma_max_abs_m": max(abs(a.sigma - b.sigma) for a, b in zip(poses_a, poses_b)),
        "int8_theta_max_abs_rad": max(abs(a.theta_rad - b.theta_rad) for a, b in zip(poses_a, poses_b)),
        "int8_logits_max_abs": float(np.abs(logits_a - logits_b).max()),
        "logits_range": float(logits_a.max() - logits_a.min()),
        "int8_top1_same": bool(int(logits_a.argmax()) == int(logits_b.argmax())),
    }


def run_child(argv: list[str]) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "loc3r.bench.scenes", *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.scenes")
    parser.add_argument("--model", default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "VIDEO", "CACHE"))
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    if args.child:
        from loc3r.bench.presets import resolve_bench_model

        kind, video, cache = args.child
        model = str(resolve_bench_model(args.model))
        if kind == "inproc":
            result = in_process(model, video, cache, args.rounds)
        else:
            result = {"kind": kind, **child_reopen(model, video, cache, warm=kind == "reopen-warm")}
        print(json.dumps(result))
        return 0
    from loc3r.bench.presets import resolve_bench_model
    from loc3r.bench.provenance import start
    from loc3r.bench.report import machine_info
    from loc3r.runtime.demo_video import write_demo_video

    command = ["python", "-m", "loc3r.bench.scenes", *(sys.argv[1:] if argv is None else argv)]
    stem = Path(args.json_out).stem if args.json_out else f"scenes_{args.model}"
    recording = start(stem, command, "in one process: stored KV and recompute alternate (A B, B A, ...); fresh processes: "
                      "reopen and reopen-warm alternate which goes first every round", args.rounds, args.allow_unreachable)
    resolve_bench_model(args.model)  # built once, before any timing
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="loc3r-bench-scenes-") as tmp:
        video = str(write_demo_video(Path(tmp) / "scene.mp4", **VIDEO))
        cache = str(Path(tmp) / "cache")
        cold = run_child(["--model", args.model, "--child", "inproc", video, cache, "--rounds", str(args.rounds)])
        kinds = ("reopen", "reopen-warm")
        reopen = [run_child(["--model", args.model, "--child", kind, video, cache])
                  for i in range(args.rounds) for kind in (kinds if i % 2 == 0 else kinds[::-1])]
    doc = {"provenance": recording.finish(), "model": args.model, "machine": machine, "in_process": cold, "reopen": reopen}
    text = json.dumps(doc, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
