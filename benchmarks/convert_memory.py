"""Peak memory of ``loc3r-convert`` on a synthetic ~1B-parameter LLaVA-NeXT checkpoint.

Run: ``python -m loc3r.bench.convert_memory [--out benchmarks/results] [--workdir DIR]``.
The checkpoint (SigLIP so400m tower as LLaVA-NeXT saves it, 26 layers; a Qwen2 with 1536
width and 10 layers; bf16) is written shard by shard into 4 safetensors files, so the
fabrication never holds more than one shard. The conversion (with a tiny CUT3R: the
real camera path is loaded by ``load_cut3r`` memory-mapped, outside this measurement) runs
in a subprocess; its peak RSS is the child's ``VmHWM``. An import-only subprocess gives the
baseline (torch + transformers), so the conversion's own share can be compared with the
largest source shard.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from loc3r.models.cut3r import Cut3rConfig, official_model_line, random_state_dict, save_official_checkpoint
from loc3r.models.tokenizer import train_tiny_tokenizer

SHARDS = 4
LIMIT = 1.5  # peak above baseline must stay below LIMIT x the largest source shard
TOWER = dict(hidden=1152, intermediate=4304, stored_layers=26, patches=729, patch=14)
LLM = dict(vocab_size=32000, hidden_size=1536, intermediate_size=8960, num_hidden_layers=10,
           num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
           rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
CONVERT = "import sys; from loc3r.models.convert_cli import main; code = main(sys.argv[1:])\nif code: sys.exit(code)"
IMPORT_ONLY = "import loc3r.models.convert_bundle, loc3r.models.cut3r"
# The child prints its own high-water RSS on exit (``ru_maxrss`` of a child would include
# the parent's RSS at fork time; VmHWM belongs to the child's fresh address space).
REPORT_HWM = "\nprint(next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')))"


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the synthetic checkpoint, LLaVA-NeXT names, in file order."""
    h, i, t = TOWER["hidden"], TOWER["intermediate"], "model.vision_tower.vision_tower.vision_model."
    d, f, kv = LLM["hidden_size"], LLM["intermediate_size"], LLM["num_key_value_heads"] * LLM["hidden_size"] // LLM["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {
        t + "embeddings.patch_embedding.weight": (h, 3, TOWER["patch"], TOWER["patch"]),
        t + "embeddings.patch_embedding.bias": (h,),
        t + "embeddings.position_embedding.weight": (TOWER["patches"], h),
    }
    for n in range(TOWER["stored_layers"]):
        p = f"{t}encoder.layers.{n}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            shapes |= {p + name + ".weight": (h, h), p + name + ".bias": (h,)}
        shapes |= {p + "mlp.fc1.weight": (i, h), p + "mlp.fc1.bias": (i,), p + "mlp.fc2.weight": (h, i), p + "mlp.fc2.bias": (h,)}
        shapes |= {p + f"layer_norm{k}.{w}": (h,) for k in (1, 2) for w in ("weight", "bias")}
    shapes |= {t + "post_layernorm.weight": (h,), t + "post_layernorm.bias": (h,)}
    shapes |= {"model.mm_projector.0.weight": (d, h), "model.mm_projector.0.bias": (d,),
               "model.mm_projector.2.weight": (d, d), "model.mm_projector.2.bias": (d,), "model.image_newline": (d,)}
    shapes["model.embed_tokens.weight"] = (LLM["vocab_size"], d)
    for n in range(LLM["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
                   p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
                   p + "self_attn.o_proj.weight": (d, d), p + "mlp.gate_proj.weight": (f, d),
                   p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    shapes |= {"model.norm.weight": (d,), "lm_head.weight": (LLM["vocab_size"], d)}
    return shapes


def fabricate(folder: Path) -> list[int]:
    """Write the checkpoint (config, tokenizer, 4 bf16 shards + index); returns shard sizes."""
    shapes = checkpoint_shapes()
    total = sum(math.prod(s) for s in shapes.values()) * 2
    groups: list[list[str]] = [[]]
    filled = 0
    for name, shape in shapes.items():
        if filled >= total / SHARDS * len(groups):
            groups.append([])
        groups[-1].append(name)
        filled += math.prod(shape) * 2
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {**LLM, "model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"],
              "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": TOWER["hidden"], "mm_vision_select_layer": -2, "mm_spatial_pool_mode": "bilinear",
              "mm_spatial_pool_stride": 2, "mm_newline_position": "grid", "image_aspect_ratio": "anyres_max_9"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    corpus = resources.files("loc3r").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    train_tiny_tokenizer(corpus.splitlines()).save(folder)
    return [(folder / f).stat().st_size for f in dict.fromkeys(weight_map.values())]


def peak_rss(code: str, args: Sequence[str] = ()) -> tuple[int, float]:
    """Peak RSS (bytes, the child's VmHWM) and wall time of ``python -c code args``."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + REPORT_HWM, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{code[:40]}... failed ({done.returncode}): {done.stderr.strip()}")
    kib = int(done.stdout.strip().splitlines()[-1].split()[1])
    return kib * 1024, time.perf_counter() - start


def report(shards: list[int], out_files: list[int], convert: tuple[int, float], baseline: int) -> str:
    mb = 1e6
    params = sum(math.prod(s) for s in checkpoint_shapes().values())
    extra = convert[0] - baseline
    ratio = extra / max(shards)
    return "\n".join([
        "# loc3r-convert peak memory",
        "",
        f"Generated by `python -m loc3r.bench.convert_memory` on {time.strftime('%Y-%m-%d')}. Do not edit by hand.",
        "",
        f"Synthetic LLaVA-NeXT checkpoint: {params / 1e9:.2f} B parameters, bf16, {len(shards)} safetensors shards "
        f"({', '.join(f'{s / mb:.0f}' for s in shards)} MB); SigLIP so400m (26 stored layers), Qwen2 "
        f"{LLM['hidden_size']} wide x {LLM['num_hidden_layers']} layers; tiny CUT3R. Default output shards "
        f"(<= 2000 MB): {len(out_files)} file(s), {', '.join(f'{s / mb:.0f}' for s in out_files)} MB.",
        "",
        "| measure | MB |",
        "|---|---|",
        f"| peak RSS, conversion subprocess | {convert[0] / mb:.0f} |",
        f"| peak RSS, imports only (torch, transformers, loc3r) | {baseline / mb:.0f} |",
        f"| conversion's own share (difference) | {extra / mb:.0f} |",
        f"| largest source shard | {max(shards) / mb:.0f} |",
        f"| whole checkpoint | {sum(shards) / mb:.0f} |",
        "",
        f"Own share = {ratio:.2f} x the largest source shard (limit {LIMIT}): **{'pass' if ratio <= LIMIT else 'FAIL'}**. "
        f"Conversion wall time {convert[1]:.1f} s. Peak RSS is the subprocess's `VmHWM` (/proc) and includes the "
        "memory-mapped pages of the source shard being read.",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_memory", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="where to write the ~2 GB checkpoint and bundle (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        (work / "llava").mkdir()
        shards = fabricate(work / "llava")
        cut3r = work / "cut3r_tiny.pth"
        save_official_checkpoint(random_state_dict(Cut3rConfig.tiny(), seed=0), official_model_line(Cut3rConfig.tiny()), cut3r)
        baseline, _ = peak_rss(IMPORT_ONLY)
        convert = peak_rss(CONVERT, ["--llava", str(work / "llava"), "--cut3r", str(cut3r), "--out", str(work / "bundle")])
        out_files = sorted((work / "bundle").glob("*.safetensors"))
        text = report(shards, [f.stat().st_size for f in out_files], convert, baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert_memory.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
