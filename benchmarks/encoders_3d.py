"""3D encoders compared: CUT3R (streams, one step per frame) vs VGGT (attends over the whole clip).

    python -m loc3r.bench.encoders_3d [--frames 32] [--repeats 3] [--scaling 8 16 32] [--out benchmarks/results]

Two parts, in one run:
- Real size, computed: FLOPs and parameters of CUT3R's camera path (512 DPT checkpoint at
  384x512) and VGGT-1B's aggregator (392x518: the same 4:3 frame) for 8..64 frames, and the
  roofline floor (``floor.stage_floor``) on the Jetson AGX Orin of the work that remains
  after the last frame arrives: CUT3R one step and the last frame blocks' prefill; VGGT the
  whole clip and then the whole video prefix, since every frame block starts with its
  camera token and nothing after the first one can be prefilled before VGGT has run.
- Small presets, measured on this CPU in **CPU seconds** of this process (``time.process_time``)
  with one torch thread, so that other load on a shared machine stretches wall time but not
  the figures (wall seconds are kept in the JSON): each encoder alone on clips of
  ``--scaling`` lengths, then ``small`` (CUT3R) and ``small-vggt`` sessions (torch, fp32) fed
  pre-decoded frames one by one as a stream would: each ``add_frame``, ``finish``, and the
  first question (to its first token), and the peak RSS growth per session; the two
  alternate in order across repeats. The measured VGGT/CUT3R ratio is set beside the FLOP
  ratio at the same sizes, which tells how far the FLOP model (and so the real-size figures)
  carries over to a CPU.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loc3r.bench.floor import stage_floor
from loc3r.bench.flops import Cut3rSizes, cut3r_frame, llm_forward, vggt_clip, vggt_global_attention_flops
from loc3r.bench.memory import RssSampler
from loc3r.bench.presets import SMALL_NAME, SMALL_VGGT_NAME, resolve_bench_model, small_cut3r, small_vggt
from loc3r.bench.report import machine_info
from loc3r.engines.targets import load_target
from loc3r.bench.provenance import header, start
from loc3r.fileio import atomic_file, write_json_atomic
from loc3r.models.config import Loc3rConfig
from loc3r.models.cut3r import Cut3rCameraEncoder, Cut3rConfig
from loc3r.models.vggt import VggtCameraEncoder, VggtConfig
from loc3r.models.vision import vision_tokens_per_frame
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.preprocess import camera_input
from loc3r.runtime.session import VISION_BATCH
from loc3r.runtime.video import Frame, iter_frames

CUT3R_SIZE = (384, 512)  # 4:3 at CUT3R's 512 long side
VGGT_SIZE = (392, 518)  # the same frame through vggt_input
FRAME_COUNTS = (8, 16, 32, 64)
FLOOR_TARGET = "jetson-orin-agx"
GIGA, TERA = 1e9, 1e12


def encoder_params(encoder: torch.nn.Module) -> int:
    return sum(p.numel() for p in encoder.parameters())


def step_tokens(config: Cut3rConfig) -> int:
    """The longest token sequence of one CUT3R step: the image stream (patches + pose token) or the state."""
    patches = (CUT3R_SIZE[0] // config.patch_size) * (CUT3R_SIZE[1] // config.patch_size)
    return max(patches + 1, config.state_size)


def clip_tokens_per_frame(config: VggtConfig) -> int:
    """Camera + register + patch tokens of one frame in VGGT's aggregator."""
    return (VGGT_SIZE[0] // config.patch_size) * (VGGT_SIZE[1] // config.patch_size) + 1 + config.num_register_tokens


def real_size_costs(target_name: str = FLOOR_TARGET) -> dict[str, Any]:
    """FLOPs, parameters and the after-the-last-frame floor of both encoders at real size."""
    cut3r_config, vggt_config, real = Cut3rConfig.real_512_dpt(), VggtConfig(), Loc3rConfig(model_id="LLaVA-Video-7B")
    llm, tokens_per_frame = real.llm, 1 + vision_tokens_per_frame(real)  # camera token + 210 vision tokens
    with torch.device("meta"):
        params = {"cut3r": encoder_params(Cut3rCameraEncoder(cut3r_config)), "vggt": encoder_params(VggtCameraEncoder(vggt_config))}
    hw = load_target(target_name).hardware
    step = cut3r_frame(Cut3rSizes(cut3r_config, *CUT3R_SIZE))
    rows = []
    for frames in FRAME_COUNTS:
        vggt = vggt_clip(vggt_config, frames, *VGGT_SIZE)
        prefix = frames * tokens_per_frame
        tail = min(VISION_BATCH, frames) * tokens_per_frame  # CUT3R: the last SigLIP batch's blocks
        cut3r_after = stage_floor(step.flops, params["cut3r"] * 2, hw).seconds
        cut3r_after += stage_floor(llm_forward(llm, tail, prefix - tail).flops, 0.0, hw).seconds
        vggt_after = stage_floor(vggt.flops, params["vggt"] * 2, hw).seconds
        vggt_after += stage_floor(llm_forward(llm, prefix).flops, 0.0, hw).seconds
        rows.append({
            "frames": frames,
            "largest_activation_mib": {  # one MLP hidden tensor in fp16: VGGT's global blocks hold the whole clip
                "cut3r": max(step_tokens(cut3r_config), 1) * cut3r_config.enc_embed_dim * cut3r_config.mlp_ratio * 2 / 2**20,
                "vggt": frames * clip_tokens_per_frame(vggt_config) * vggt_config.embed_dim * vggt_config.mlp_ratio * 2 / 2**20,
            },
            "cut3r_tflop": step.flops * frames / TERA,
            "vggt_tflop": vggt.flops / TERA,
            "vggt_global_attention_tflop": vggt_global_attention_flops(vggt_config, frames, *VGGT_SIZE) / TERA,
            "vggt_over_cut3r": vggt.flops / (step.flops * frames),
            "after_last_frame_floor_s": {"cut3r": cut3r_after, "vggt": vggt_after},
        })
    return {
        "cut3r": {"config": "cut3r_512_dpt", "input": list(CUT3R_SIZE), "params": params["cut3r"], "fp16_weights_gib": params["cut3r"] * 2 / 2**30},
        "vggt": {"config": "VGGT-1B aggregator", "input": list(VGGT_SIZE), "params": params["vggt"], "fp16_weights_gib": params["vggt"] * 2 / 2**30,
                 "camera_dim": vggt_config.camera_dim},
        "floor_target": target_name,
        "floor_note": "compute floors at the target's dense fp16 peak; LLM prefill compute only (its weights "
                      "are read in either case); the 8-frame SigLIP batch that both still run is left out",
        "frames": rows,
    }


def decoded_frames(frames: int, workdir: Path) -> list[Frame]:
    """``frames`` frames of a 640x480 demo video, decoded once for every session."""
    video = write_demo_video(workdir / "scene.mp4", num_frames=96, width=640, height=480, fps=8)
    return list(iter_frames(video, frames))


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``fn()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def stream_session(pipeline: Pipeline, frames: list[Frame]) -> dict[str, float]:
    """Feed ``frames`` one by one, finish, ask once (to the first token): CPU seconds of each part."""
    session = pipeline.new_session("bench", live=False)
    add = [timed(lambda f=frame: session.add_frame(f)) for frame in frames]
    finish = timed(session.finish)
    ask = timed(lambda: session.ask("Where am I?", sampling=SamplingConfig(max_new_tokens=1)))
    parts = {"add_frame_median": [statistics.median(a[i] for a in add) for i in (0, 1)], "last_add_frame": add[-1],
             "finish": finish, "first_question": ask,
             "after_last_frame": [add[-1][i] + finish[i] + ask[i] for i in (0, 1)],
             "total": [sum(a[i] for a in add) + finish[i] + ask[i] for i in (0, 1)]}
    return {**{f"{k}_cpu_s": v[0] for k, v in parts.items()}, **{f"{k}_wall_s": v[1] for k, v in parts.items()}}


def encode_alone(pipeline: Pipeline, frames: list[Frame]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the encoder (no f_cam) over ``frames``, one clip."""
    images = torch.stack([camera_input(f.rgb, pipeline.config) for f in frames])
    with torch.inference_mode():
        return timed(lambda: pipeline.bundle.model.camera_encoder.encode(images))


def small_flops(frames: int) -> dict[str, float]:
    return {
        "cut3r": cut3r_frame(Cut3rSizes(small_cut3r(), *CUT3R_SIZE)).flops * frames,
        "vggt": vggt_clip(small_vggt(), frames, *VGGT_SIZE).flops,
    }


def measure_small(frames: int, repeats: int, scaling: list[int]) -> dict[str, Any]:
    """Encoders alone on clips of ``scaling`` lengths, then streamed sessions; each ``repeats``
    times, the two encoders alternating which goes first; medians."""
    names = {"cut3r": SMALL_NAME, "vggt": SMALL_VGGT_NAME}
    pipelines = {kind: Pipeline.from_pretrained(resolve_bench_model(name)) for kind, name in names.items()}
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in pipelines}
    with tempfile.TemporaryDirectory() as tmp, RssSampler(interval_s=0.05) as sampler:
        clip = decoded_frames(max([frames, *scaling]), Path(tmp))
        for pipeline in pipelines.values():
            stream_session(pipeline, clip[:2])  # warm-up: first-call allocations
        alone_runs: dict[str, dict[int, list[tuple[float, float]]]] = {kind: {n: [] for n in scaling} for kind in pipelines}
        for i in range(repeats):
            for kind in list(pipelines) if i % 2 == 0 else list(pipelines)[::-1]:
                for n in scaling:
                    alone_runs[kind][n].append(encode_alone(pipelines[kind], clip[:n]))
        alone = {kind: {n: statistics.median(c for c, _ in rs) for n, rs in by_n.items()} for kind, by_n in alone_runs.items()}
        alone_wall = {kind: {n: statistics.median(w for _, w in rs) for n, rs in by_n.items()} for kind, by_n in alone_runs.items()}
        for i in range(repeats):
            order = list(pipelines) if i % 2 == 0 else list(pipelines)[::-1]
            for kind in order:
                print(f"repeat {i + 1}/{repeats}: {kind}", file=sys.stderr, flush=True)
                with sampler.phase(kind):
                    runs[kind].append(stream_session(pipelines[kind], clip[:frames]))
    medians = {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for kind, rs in runs.items()}
    flops = {n: small_flops(n) for n in scaling}
    return {
        "frames": frames,
        "repeats": repeats,
        "runs": runs,
        "medians": medians,
        "memory": sampler.phases,
        "encode_alone_cpu_s": alone,
        "encode_alone_wall_s": alone_wall,
        "encode_alone_gflops_per_cpu_s": {k: {n: flops[n][k] / alone[k][n] / GIGA for n in scaling} for k in pipelines},
        "flops": flops,
    }


def _s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def legacy_header(doc: dict[str, Any]) -> list[str]:
    """The header of a result recorded before the provenance record (its machine section)."""
    machine = doc["machine"]
    return [f"Command: `{doc['command']}`  ",
            f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['versions'].get('torch')} "
            f"({machine['torch_threads']} threads), load average at start {machine['load_average_at_start']}, "
            f"commit {machine['git_commit']}. Random weights: costs only."]


def markdown(doc: dict[str, Any]) -> str:
    real, small = doc["real_size"], doc["small"]
    m = small["medians"]
    machine = doc["machine"]
    torch_version = machine["versions"].get("torch")
    caveats = [line for caveat in doc.get("caveats", []) for line in (caveat, "")]
    lines = [
        "# 3D encoders: CUT3R vs VGGT",
        "",
        *caveats,
        *(header(doc["provenance"]) + [f"torch {torch_version} ({machine['torch_threads']} threads). Random weights: costs only."]
          if "provenance" in doc else legacy_header(doc)),
        "",
        "## Real size (computed)",
        "",
        f"CUT3R camera path ({real['cut3r']['config']}, {real['cut3r']['input'][0]}x{real['cut3r']['input'][1]}): "
        f"{real['cut3r']['params'] / 1e6:.0f} M parameters ({real['cut3r']['fp16_weights_gib']:.2f} GiB fp16). "
        f"VGGT ({real['vggt']['config']}, {real['vggt']['input'][0]}x{real['vggt']['input'][1]}): "
        f"{real['vggt']['params'] / 1e6:.0f} M parameters ({real['vggt']['fp16_weights_gib']:.2f} GiB fp16), "
        f"camera token {real['vggt']['camera_dim']}-d.",
        "",
        f"| frames | CUT3R TFLOP | VGGT TFLOP | of which global attention | VGGT / CUT3R | after the last frame, floor on {real['floor_target']}: CUT3R | VGGT "
        "| largest activation (fp16): CUT3R | VGGT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in real["frames"]:
        after, act = row["after_last_frame_floor_s"], row["largest_activation_mib"]
        lines.append(
            f"| {row['frames']} | {row['cut3r_tflop']:.1f} | {row['vggt_tflop']:.1f} | {row['vggt_global_attention_tflop']:.1f} "
            f"| {row['vggt_over_cut3r']:.2f}x | {_s(after['cut3r'])} | {_s(after['vggt'])} | {act['cut3r']:.1f} MiB | {act['vggt']:.0f} MiB |"
        )
    lines += [
        "",
        f"Floors: {real['floor_note']}.",
        "",
        "## Small presets, measured (CPU seconds, one thread)",
        "",
        "Each encoder alone (no f_cam), one clip"
        + (f"; median of {small['repeats']}, the encoders alternating:" if "provenance" in doc else ":"),
        "",
        "| frames | CUT3R | VGGT | VGGT / CUT3R | FLOP ratio | GFLOP per CPU-second: CUT3R | VGGT |",
        "|---|---|---|---|---|---|---|",
    ]
    alone, rate = small["encode_alone_cpu_s"], small["encode_alone_gflops_per_cpu_s"]
    for n, cut3r in alone["cut3r"].items():
        vggt, flops = alone["vggt"][n], small["flops"][n]
        lines.append(
            f"| {n} | {_s(cut3r)} | {_s(vggt)} | {vggt / cut3r:.2f}x | {flops['vggt'] / flops['cut3r']:.2f}x "
            f"| {rate['cut3r'][n]:.0f} | {rate['vggt'][n]:.0f} |"
        )
    lines += [
        "",
        f"A session of {small['frames']} frames fed one by one (median of {small['repeats']}):",
        "",
        "| | CUT3R (`small`) | VGGT (`small-vggt`) | VGGT / CUT3R |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("add_frame_median", "`add_frame`, median"),
        ("finish", "`finish` (end of the video)"),
        ("first_question", "first question, to its first token"),
        ("after_last_frame", "**last frame -> first token**"),
        ("total", "session total"),
    ):
        cut3r, vggt = m["cut3r"][f"{key}_cpu_s"], m["vggt"][f"{key}_cpu_s"]
        lines.append(f"| {label} | {_s(cut3r)} | {_s(vggt)} | {vggt / cut3r:.1f}x |")
    mem = small["memory"]
    lines += [
        f"| peak RSS growth in a session | {mem['cut3r']['growth_mib']:.0f} MiB | {mem['vggt']['growth_mib']:.0f} MiB | |",
        "",
        "RSS growth is over what the process already held: the warm-up and the encoders-alone runs",
        "came first, so a session's growth is what it needed beyond that (CUT3R's per-frame working",
        "memory was already allocated; VGGT's whole-clip activations were not, at 32 frames).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.encoders_3d", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="repeats per encoder, alternating (medians; default 3)")
    parser.add_argument("--scaling", type=int, nargs="+", default=[8, 16, 32], help="clip lengths to time each encoder alone on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU seconds are comparable only at 1)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = ["python", "-m", "loc3r.bench.encoders_3d", *(argv if argv is not None else sys.argv[1:])]
    recording = start("encoders_3d", command, "CUT3R and VGGT alternate which runs first (A B, B A, ...)",
                      args.repeats, args.allow_unreachable)
    doc = {
        "command": shlex.join(command),
        "machine": machine_info(),
        "real_size": real_size_costs(),
        "small": measure_small(args.frames, args.repeats, args.scaling),
    }
    doc["provenance"] = recording.finish()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "encoders_3d.json", doc)
    with atomic_file(out / "encoders_3d.md") as stream:
        stream.write(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
