"""Roofline floor of one Loc3R question on each target: time and memory no stack can beat.

Each stage's floor is ``max(FLOPs / peak, bytes / bandwidth)`` with the target's dense peak
at its build precision and its memory bandwidth, both scaled by ``efficiency`` (1.0 = the
floor itself; a measured/floor ratio tells what a stack reaches). Bytes are the weights a stage must read
(re-read per frame for the recurrent CUT3R step) plus the KV cache it reads and writes;
activations are assumed to stay on chip. Memory is counted in GiB, bandwidth in GB/s.

``python -m loc3r.bench.floor --markdown`` prints the side-by-side table of every target.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from loc3r.bench.flops import (
    Cut3rSizes,
    bits_per_weight,
    cut3r_frame,
    kv_bytes_per_token,
    llm_forward,
    loc3r_heads_params,
    projector_frame,
    siglip_frame,
    vocab_params,
)
from loc3r.engines.targets import Hardware, Target, list_targets, load_target
from loc3r.models.config import HeadsConfig, LLMConfig, VisionConfig

GIB = 2.0**30
TABLE_ORDER = ("jetson-orin-agx", "jetson-orin-agx-32gb", "orin-nx", "orin-nano-super", "orin-nano", "x86-cuda", "cpu")
STAGE_LABELS = (
    ("cut3r", "CUT3R camera path, all frames"),
    ("cut3r_with_heads", "CUT3R with DPT/pose heads, all frames"),
    ("vision", "SigLIP (26 layers) + projector, all frames"),
    ("prefill", "LLM prefill, whole prompt"),
    ("question_prefill", "LLM prefill, question over the cached prefix"),
    ("decode_token", "LLM decode, one token"),
)
Cell = Callable[[dict[str, Any]], str]  # one target's report -> one table cell
VALUE_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0}  # activations and KV cache


@dataclass(frozen=True)
class PaperReference:
    """Loc3R-VLM paper's measurements on one RTX 4090 (PyTorch, fp16/bf16 LLM)."""

    cut3r_s: float = 1.2  # CUT3R encoding of 32 frames
    ttft_s: float = 2.6
    vram_gb: float = 20.3
    vram_without_cut3r_gb: float = 19.0


PAPER_RTX4090 = PaperReference()


@dataclass(frozen=True)
class ModelSizes:
    """The real model: SigLIP so400m/14-384, Qwen2-7B, CUT3R 512 DPT, Loc3R heads."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    cut3r: Cut3rSizes = field(default_factory=Cut3rSizes)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    vision_layers_used: int = 26  # select layer -2: the last of 27 layers is never run


@dataclass(frozen=True)
class Workload:
    """One question on a 32-frame video; text token counts are estimates for Qwen2's BPE."""

    frames: int = 32
    tokens_per_frame: int = 211  # camera token + 14 x 15 pooled vision tokens with row newlines
    head_tokens: int = 20  # system prompt and user header before the video
    tail_tokens: int = 230  # time instruction after the video (32 timestamps); still prefix
    question_tokens: int = 80  # situation, <Pos><Ori>, question, assistant header
    answer_tokens: int = 64  # KV room for the answer

    @property
    def prefix_tokens(self) -> int:
        """Tokens whose KV depends only on the video (cached across questions)."""
        return self.head_tokens + self.frames * self.tokens_per_frame + self.tail_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.prefix_tokens + self.question_tokens


@dataclass(frozen=True)
class StageFloor:
    """A stage's FLOPs and bytes and the time each would take alone."""

    flops: float
    bytes: float
    compute_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        """The floor: the stage cannot finish before both its compute and its traffic."""
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": self.seconds, "bound": self.bound}


def stage_floor(flops: float, nbytes: float, hw: Hardware, efficiency: float = 1.0) -> StageFloor:
    """Roofline time of ``flops`` and ``nbytes`` on ``hw`` at ``efficiency`` of peak."""
    if not 0.0 < efficiency <= 1.0:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    compute_s = flops / (hw.peak_tflops * 1e12 * efficiency)
    memory_s = nbytes / (hw.bandwidth_gbs * 1e9 * efficiency)
    return StageFloor(flops, nbytes, compute_s, memory_s)


def llm_weight_bytes(target: Target, llm: LLMConfig) -> float:
    """Bytes of the decoder layers and ``lm_head`` at the target's quantization."""
    q = target.llm
    layers = llm_forward(llm, 1).params * bits_per_weight(q.weights, q.block_size) / 8
    return layers + vocab_params(llm) * bits_per_weight(q.lm_head, q.block_size) / 8


def stage_floors(
    target: Target, sizes: ModelSizes, work: Workload, efficiency: float = 1.0
) -> dict[str, StageFloor]:
    """Floors of every stage of one question on ``target``."""
    hw, llm = target.hardware, sizes.llm
    act = VALUE_BYTES[target.build.precision]
    kv = kv_bytes_per_token(llm, VALUE_BYTES[target.llm.kv_cache])
    weights = llm_weight_bytes(target, llm)

    cut3r = cut3r_frame(sizes.cut3r) * work.frames
    cut3r_full = cut3r_frame(sizes.cut3r, with_heads=True) * work.frames
    vision = siglip_frame(sizes.vision, sizes.vision_layers_used) + projector_frame(sizes.vision, llm)
    prefill = llm_forward(llm, work.prompt_tokens)
    question = llm_forward(llm, work.question_tokens, work.prefix_tokens)
    decode = llm_forward(llm, 1, work.prompt_tokens)
    return {
        # the recurrent step re-reads its weights for every frame
        "cut3r": stage_floor(cut3r.flops, cut3r.params * act, hw, efficiency),
        "cut3r_with_heads": stage_floor(cut3r_full.flops, cut3r_full.params * act, hw, efficiency),
        # frames are batched: weights read once
        "vision": stage_floor(vision.flops * work.frames, vision.params * act, hw, efficiency),
        "prefill": stage_floor(prefill.flops, weights + work.prompt_tokens * kv, hw, efficiency),
        "question_prefill": stage_floor(question.flops, weights + work.prompt_tokens * kv, hw, efficiency),
        "decode_token": stage_floor(decode.flops, weights + (work.prompt_tokens + 1) * kv, hw, efficiency),
    }


def memory_floor(target: Target, sizes: ModelSizes, work: Workload) -> dict[str, Any]:
    """Resident bytes (GiB): weights at their formats, KV cache of prompt + answer; fits?"""
    llm, act = sizes.llm, VALUE_BYTES[target.build.precision]
    vision = siglip_frame(sizes.vision, sizes.vision_layers_used).params + projector_frame(sizes.vision, llm).params
    heads = loc3r_heads_params(llm, sizes.heads.hidden_size, sizes.heads.ori_bins, sizes.cut3r.config.dec_embed_dim)
    parts = {
        "llm_gib": llm_weight_bytes(target, llm) / GIB,
        "embedding_gib": vocab_params(llm) * act / GIB,
        "vision_gib": vision * act / GIB,
        "cut3r_gib": cut3r_frame(sizes.cut3r).params * act / GIB,
        "heads_gib": heads * act / GIB,
        "kv_gib": (work.prompt_tokens + work.answer_tokens)
        * kv_bytes_per_token(llm, VALUE_BYTES[target.llm.kv_cache])
        / GIB,
    }
    total = sum(parts.values())
    usable = target.hardware.memory_gb - target.hardware.reserved_gb
    return {**parts, "total_gib": total, "usable_gib": usable, "fits": total <= usable}


def floor_report(
    target: Target | str,
    work: Workload | None = None,
    sizes: ModelSizes | None = None,
    efficiency: float = 1.0,
) -> dict[str, Any]:
    """Stage floors, end-to-end TTFT / decode rate and the memory floor of one target."""
    target = load_target(target) if isinstance(target, str) else target
    work, sizes = work or Workload(), sizes or ModelSizes()
    stages = stage_floors(target, sizes, work, efficiency)
    return {
        "target": target.name,
        "device": target.hardware.device,
        "peak_tflops": target.hardware.peak_tflops,
        "bandwidth_gbs": target.hardware.bandwidth_gbs,
        "llm_weights": _llm_format(target),
        "efficiency": efficiency,
        "workload": {**asdict(work), "prefix_tokens": work.prefix_tokens, "prompt_tokens": work.prompt_tokens},
        "stages": {name: s.to_dict() for name, s in stages.items()},
        # nothing streams: encode every frame, then prefill the whole prompt
        "ttft_cold_s": stages["cut3r"].seconds + stages["vision"].seconds + stages["prefill"].seconds,
        # video prefix encoded and its KV cached (or streamed in during capture)
        "ttft_cached_s": stages["question_prefill"].seconds,
        "decode_tok_s": 1.0 / stages["decode_token"].seconds,
        "memory": memory_floor(target, sizes, work),
    }


def all_reports(names: Sequence[str] | None = None, efficiency: float = 1.0) -> list[dict[str, Any]]:
    """:func:`floor_report` of ``names`` (default: every shipped target, Jetsons first)."""
    names = names or sorted(list_targets(), key=lambda n: (TABLE_ORDER + (n,)).index(n))
    return [floor_report(name, efficiency=efficiency) for name in names]


def paper_comparison(report: dict[str, Any], paper: PaperReference = PAPER_RTX4090) -> list[tuple[str, float, float]]:
    """(what, measured, floor) rows for the paper's RTX 4090 numbers against a report."""
    st, mem = report["stages"], report["memory"]
    return [
        ("CUT3R encode, 32 frames, s (floor: camera path)", paper.cut3r_s, st["cut3r"]["seconds"]),
        ("CUT3R encode, 32 frames, s (floor: with DPT/pose heads)", paper.cut3r_s, st["cut3r_with_heads"]["seconds"]),
        ("TTFT, s (floor: CUT3R + vision + full prefill)", paper.ttft_s, report["ttft_cold_s"]),
        ("TTFT, s (floor: vision + full prefill, if CUT3R is excluded)", paper.ttft_s,
         st["vision"]["seconds"] + st["prefill"]["seconds"]),
        ("VRAM, GB as reported (floor in GiB: weights + KV)", paper.vram_gb, mem["total_gib"]),
        ("VRAM without CUT3R, GB (floor)", paper.vram_without_cut3r_gb, mem["total_gib"] - mem["cut3r_gib"]),
    ]


def render_markdown(reports: Sequence[dict[str, Any]], paper_target: str = "x86-cuda") -> str:
    """Side-by-side tables of ``reports`` and the paper comparison for ``paper_target``."""
    head = "| | " + " | ".join(r["target"] for r in reports) + " |"
    rule = "|---|" + "---|" * len(reports)

    def row(label: str, cell: Cell) -> str:
        return f"| {label} | " + " | ".join(cell(r) for r in reports) + " |"

    def stage(name: str) -> Cell:
        return lambda r: f"{_fmt_s(r['stages'][name]['seconds'])} {r['stages'][name]['bound'][0].upper()}"

    work = reports[0]["workload"]
    time_rows = [
        row("peak dense TFLOPS / GB/s", lambda r: f"{r['peak_tflops']:g} / {r['bandwidth_gbs']:g}"),
        row("LLM weights", lambda r: r["llm_weights"]),
        row(f"CUT3R, {work['frames']} frames (camera path), s", stage("cut3r")),
        row(f"CUT3R + DPT/pose heads, {work['frames']} frames, s", stage("cut3r_with_heads")),
        row(f"SigLIP + projector, {work['frames']} frames, s", stage("vision")),
        row(f"prefill, {work['prompt_tokens']} tokens, s", stage("prefill")),
        row("**TTFT cold** (encode + prefill), s", lambda r: f"**{_fmt_s(r['ttft_cold_s'])}**"),
        row(f"**TTFT prefix cached** ({work['question_tokens']} tokens), s",
            lambda r: f"**{_fmt_s(r['ttft_cached_s'])}** {r['stages']['question_prefill']['bound'][0].upper()}"),
        row(f"**decode**, tok/s at {work['prompt_tokens']} context",
            lambda r: f"**{r['decode_tok_s']:.1f}** {r['stages']['decode_token']['bound'][0].upper()}"),
    ]

    def mem(key: str) -> Cell:
        return lambda r: f"{r['memory'][key]:.2f}"

    mem_rows = [
        row("LLM layers + lm_head", mem("llm_gib")),
        row("embedding table", mem("embedding_gib")),
        row("SigLIP (26 layers) + projector", mem("vision_gib")),
        row("CUT3R camera path", mem("cut3r_gib")),
        row("Loc3R heads", mem("heads_gib")),
        row(f"KV cache, {work['prompt_tokens'] + work['answer_tokens']} positions", mem("kv_gib")),
        row("**total**", lambda r: f"**{r['memory']['total_gib']:.2f}**"),
        row("usable (capacity - reserved)", mem("usable_gib")),
        row("fits (weights + KV only; activations not counted)", lambda r: "yes" if r["memory"]["fits"] else "**no**"),
    ]
    flops = reports[0]["stages"]
    work_rows = [f"| {label} | {flops[name]['flops'] / 1e12:.4g} |" for name, label in STAGE_LABELS]
    lines = ["### Work per question (FLOPs are the same on every target)", "", "| stage | TFLOP |", "|---|---|",
             *work_rows, "", "### Time floors (C = compute bound, M = memory bound)", "", head, rule, *time_rows,
             "", "### Memory floor, GiB", "", head, rule, *mem_rows]
    paper = next((r for r in reports if r["target"] == paper_target), None)
    if paper is not None:
        lines += ["", f"### The paper's figures (its authors' RTX 4090, PyTorch; not measured here) against the "
                  f"{paper_target} floor", "", "| | paper | floor | paper / floor |", "|---|---|---|---|"]
        lines += [f"| {what} | {m:g} | {f:.3g} | {m / f:.1f}x |" for what, m, f in paper_comparison(paper)]
    return "\n".join(lines) + "\n"


def _llm_format(target: Target) -> str:
    q = target.llm
    block = f"-b{q.block_size}" if q.block_size else ""
    return f"{q.weights}{block}, head {q.lm_head}" if q.weights != q.lm_head else f"{q.weights}{block}"


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 0.1 else f"{seconds:.2f}"


_PREAMBLE = """# Roofline floors per target

Generated by `{command}` on {date}. Do not edit by hand.

Floor of a stage = max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)),
efficiency = {efficiency:g} ({efficiency_note}). FLOPs count matrix products only
(2 per multiply-add); bytes are the weights each stage must read (CUT3R re-reads its
weights every frame, SigLIP batches the {frames} frames) plus the KV cache; activations are
assumed to stay on chip. Peaks are the dense tensor rates at the build precision (fp16 with
fp32 accumulate on GPUs, fp32 on the CPU); the Orin figures are derived from NVIDIA's sparse
INT8 TOPS, see `engines/*.toml`. CUT3R's camera path = ViT-L encoder, two-stream decoder
and pose-memory read/write; the DPT/pose heads are not modelled layer by layer: their FLOPs
are taken as 37% of a full frame (design note), their weights are not counted.
Token counts: {frames} frames x {tokens_per_frame} (camera + 14x15 vision) + {head} head +
{tail} time-instruction + {question} question tokens (text counts are estimates).
TTFT cold = CUT3R + SigLIP + full prefill, nothing streamed; TTFT prefix cached = prefill of
the question only over the cached video prefix. Decode = one token at the full prompt
context (weights + KV read per token). Memory in GiB (2^30; device capacities are binary,
a "64 GB" module holds 64 GiB), weights at the target's LLM
format, vision and CUT3R at the build precision; activations and workspaces are excluded,
and "reserved" is an estimate of what the OS and driver keep.

"""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loc3r.bench.floor [--markdown] [--target NAME ...] [--efficiency E]``."""
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the markdown report (default: JSON)")
    parser.add_argument("--target", action="append", help="target name (repeatable; default: all)")
    parser.add_argument("--efficiency", type=float, default=1.0, help="fraction of peak reached (default 1.0)")
    args = parser.parse_args(argv)
    reports = all_reports(args.target, args.efficiency)
    if not args.markdown:
        json.dump(reports, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    command = "python -m loc3r.bench.floor " + " ".join(argv if argv is not None else sys.argv[1:])
    work = Workload()
    sys.stdout.write(_PREAMBLE.format(
        command=command.strip(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        efficiency=args.efficiency,
        efficiency_note="the floor itself" if args.efficiency == 1.0 else "fraction of peak assumed reachable",
        frames=work.frames, tokens_per_frame=work.tokens_per_frame, head=work.head_tokens,
        tail=work.tail_tokens, question=work.question_tokens,
    ))
    sys.stdout.write(render_markdown(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
