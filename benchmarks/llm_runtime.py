"""LLM runtime benchmark (issue 15): decode speed at the full video context, and the memory a
whole-video prefill takes, torch backend vs the builder's decoder on ONNX Runtime.

    python -m loc3r.bench.llm_runtime [--model small] [--frames 16 32 64] [--out benchmarks/results]

Measured in one run, every measurement in a fresh subprocess (so that its peak RSS is its
own), on the bundle's LLM exported by ``loc3r.export.llm`` in the cpu target's fp32 form
(and int4, for reference), context limit ``CONTEXT``:

- decode: the prompt of ``--decode-frames`` frames (random frame blocks of the real
  geometry + the prompt's text) is prefilled, then ``DECODE_TOKENS`` tokens are decoded
  greedily; ms per token, best of ``REPEATS`` in each fresh subprocess, ``--rounds`` rounds
  with the backends interleaved (A B C, C B A, ...); each round's ratio onnxruntime tok/s /
  torch tok/s, and the median, min and max over rounds (``--decode-only`` skips the memory part).
- whole-video prefill (what an encoding-cache hit does): a ``VideoSession`` gets every frame
  block at once (``add_blocks``); the peak RSS growth over the call (``/proc/self/clear_refs``
  resets the peak, ``VmHWM`` reads it) for each frame count, chunked as shipped
  (``prefill_chunk`` of the target) and in one call (chunk = the whole video, what the
  previous decoder did). The KV buffers of onnxruntime are allocated (and touched) before
  the call: they are in the memory plan, not in the growth; torch's cache grows inside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loc3r.bench.presets import resolve_bench_model
from loc3r.bench.provenance import Recording, header, start
from loc3r.bench.stats import summarize
from loc3r.fileio import write_json_atomic

CONTEXT = 16384  # enough for 64 frames of 211 tokens
CHUNK = 512  # the targets' prefill_chunk
WHOLE = 1 << 30  # "chunk" of a one-call prefill
DECODE_TOKENS = 64
REPEATS = 3
FORMS = ("fp32", "int4")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (the benchmark needs Linux)")


def _stage(backend: str, model: str, export_dir: str, chunk: int):  # noqa: ANN202 - an LLMStage
    from loc3r.models.bundle import load_bundle

    bundle = load_bundle(resolve_bench_model(model))
    if backend == "torch":
        from loc3r.models.llm import TorchLLM

        return bundle, TorchLLM(bundle.model.llm, chunk_tokens=chunk)
    from loc3r.export.llm_io import DECODER, EMBEDDINGS
    from loc3r.runtime.onnx_llm import OnnxLLM

    folder = Path(export_dir) / backend.removeprefix("onnxruntime-")
    return bundle, OnnxLLM(folder / DECODER, folder / EMBEDDINGS, capacity=CONTEXT, chunk_tokens=chunk)


def _blocks(bundle: Any, frames: int) -> list[torch.Tensor]:
    from loc3r.models.vision import vision_tokens_per_frame

    width = bundle.config.llm.hidden_size
    generator = torch.Generator().manual_seed(frames)
    tokens = 1 + vision_tokens_per_frame(bundle.config)
    return [torch.randn(tokens, width, generator=generator) * 0.02 for _ in range(frames)]


def measure_decode(backend: str, model: str, export_dir: str, frames: int) -> dict[str, float]:
    """Subprocess body: prefill a ``frames``-frame prompt, then time greedy decoding."""
    bundle, llm = _stage(backend, model, export_dir, CHUNK)
    prefix = torch.cat(_blocks(bundle, frames))
    question = llm.embed(list(range(1, 40)))
    best = float("inf")
    for _ in range(REPEATS):
        llm.reset()
        llm.prefill(prefix)
        token = int(llm.prefill(question).last_logits.argmax())
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = int(llm.decode(token).argmax())
        best = min(best, (time.perf_counter() - start) / DECODE_TOKENS)
    return {"context_tokens": llm.cached_length, "ms_per_token": best * 1000, "tok_s": 1 / best}


def measure_prefill_memory(backend: str, model: str, export_dir: str, frames: int, chunk: int) -> dict[str, float]:
    """Subprocess body: the peak RSS growth of a whole-video (cache-hit) prefill."""
    from loc3r.runtime.result import ModelInfo
    from loc3r.runtime.session import FrameBlocks, Stages, VideoSession
    from loc3r.runtime.torch_backend import torch_stages

    bundle, llm = _stage(backend, model, export_dir, chunk)
    camera, vision, heads, _ = torch_stages(bundle)
    info = ModelInfo(bundle.config.model_id, bundle.checksum, True, bundle.config.localization, backend)
    encoded = FrameBlocks(_blocks(bundle, frames), list(range(frames)), [float(i) for i in range(frames)])
    warm = VideoSession(bundle, Stages(camera, vision, heads, llm), info, "warm-up")
    warm.add_blocks(FrameBlocks(encoded.blocks[:2], [0, 1], [0.0, 1.0]))  # first-call allocations
    session = VideoSession(bundle, Stages(camera, vision, heads, llm), info, "cached video")
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    session.add_blocks(encoded)
    seconds = time.perf_counter() - start
    return {
        "frames": frames,
        "tokens": llm.cached_length,
        "growth_mib": (_rss_kib("VmHWM") - before) / 1024,
        "rss_before_mib": before / 1024,
        "seconds": seconds,
    }


def _in_subprocess(function: str, *args: Any) -> dict[str, Any]:
    code = (
        "import json, sys; from loc3r.bench import llm_runtime as b; "
        f"print(json.dumps(b.{function}(*json.loads(sys.argv[1]))))"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{function}{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_forms(model: str, out: Path) -> dict[str, Any]:
    """The bundle's LLM in the cpu target's forms, at ``CONTEXT``."""
    from loc3r.engines.targets import load_target
    from loc3r.export.llm import LLMSource, export_llm, llm_form
    from loc3r.models.bundle import load_bundle

    bundle = load_bundle(resolve_bench_model(model))
    target = load_target("cpu")
    return {
        form: export_llm(LLMSource.from_bundle(bundle), out / form, llm_form(target, form), CONTEXT, CHUNK)["form"]
        for form in FORMS
    }


def run(model: str, frames: list[int], decode_frames: int, rounds: int, with_memory: bool, recording: Recording) -> dict[str, Any]:
    backends = ["torch", *(f"onnxruntime-{form}" for form in FORMS)]
    samples: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory(prefix="loc3r-llm-runtime-") as tmp:
        forms = export_forms(model, Path(tmp))
        for r in range(rounds):
            for b in backends if r % 2 == 0 else backends[::-1]:
                samples[b].append(_in_subprocess("measure_decode", b, model, tmp, decode_frames))
        memory = [
            {"backend": b, "prefill": mode, **_in_subprocess("measure_prefill_memory", b, model, tmp, n, chunk)}
            for b in ("torch", "onnxruntime-fp32")
            for mode, chunk in (("chunked", CHUNK), ("one call", WHOLE))
            for n in frames
        ] if with_memory else []
    ratios = {b: summarize([s["tok_s"] / t["tok_s"] for s, t in zip(runs, samples["torch"])]).to_dict() for b, runs in samples.items()}
    return {
        "model": model,
        "provenance": recording.finish(),
        "forms": forms,
        "context_limit": CONTEXT,
        "chunk_tokens": CHUNK,
        "decode_frames": decode_frames,
        "decode_samples": samples,
        "decode": {b: {"context_tokens": runs[0]["context_tokens"], **{k: summarize([s[k] for s in runs]).to_dict() for k in ("ms_per_token", "tok_s")}}
                   for b, runs in samples.items()},
        "decode_ratio_vs_torch": ratios,
        "prefill_memory": memory,
    }


def to_markdown(result: dict[str, Any]) -> str:
    rounds = result["provenance"]["repeats"]
    lines = [
        f"# LLM runtime: {result['model']} preset, torch vs onnxruntime (the builder's decoder)",
        "",
        *header(result["provenance"]),
        f"Context limit {result['context_limit']} tokens, prefill chunk {result['chunk_tokens']} tokens. "
        "**Random weights: timings and memory only.**",
        "",
        f"## Decode at the full video context ({result['decode_frames']} frames)",
        "",
        f"{rounds} rounds, each backend in a fresh subprocess per round (best of {REPEATS} x {DECODE_TOKENS} tokens "
        "inside it), backends interleaved; median (min-max) over rounds; the ratio is taken round by round.",
        "",
        "| backend | context tokens | ms/token | tok/s | vs torch (per round) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for backend, row in result["decode"].items():
        r = result["decode_ratio_vs_torch"][backend]
        ms, tok = row["ms_per_token"], row["tok_s"]
        lines.append(f"| {backend} | {row['context_tokens']} | {ms['median']:.2f} ({ms['min']:.2f}-{ms['max']:.2f}) | "
                     f"{tok['median']:.1f} ({tok['min']:.1f}-{tok['max']:.1f}) | {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) |")
    if not result["prefill_memory"]:
        return "\n".join([*lines, "", "The whole-video prefill memory was not measured in this run (`--decode-only`)."]) + "\n"
    lines += [
        "",
        "## Peak RSS growth of a whole-video (encoding-cache hit) prefill",
        "",
        "| backend | prefill | frames | tokens | growth MiB | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["prefill_memory"]:
        lines.append(
            f"| {row['backend']} | {row['prefill']} | {row['frames']} | {row['tokens']} "
            f"| {row['growth_mib']:.1f} | {row['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--decode-frames", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved decode rounds (fresh subprocesses)")
    parser.add_argument("--decode-only", action="store_true", help="skip the whole-video prefill memory")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    command = ["python", "-m", "loc3r.bench.llm_runtime", *(argv if argv is not None else sys.argv[1:])]
    recording = start(f"llm_runtime_{args.model}", command, "backends alternate their order every round (A B C, C B A, ...)",
                          args.rounds, args.allow_unreachable)
    result = run(args.model, args.frames, args.decode_frames, args.rounds, not args.decode_only, recording)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"llm_runtime_{args.model}.json", result)
    (args.out / f"llm_runtime_{args.model}.md").write_text(to_markdown(result), encoding="utf-8")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
