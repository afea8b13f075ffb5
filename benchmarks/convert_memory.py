"""Peak memory of ``loc3r-convert`` on a synthetic ~1B-parameter LLaVA-NeXT checkpoint.

Run: ``python -m loc3r.bench.convert_memory [--out benchmarks/results] [--workdir DIR]``.
The checkpoint (SigLIP so400m tower as LLaVA-NeXT saves it, 26 layers; a Qwen2 with 1536
width and 10 layers; bf16) is written shard by shard into 4 safetensors files, so the
fabrication never holds more than one shard. It is converted twice in a subprocess, with
a tiny CUT3R and with a real-size one (random weights); peak RSS is the child's ``VmHWM``.
An import-only subprocess gives the baseline (torch + transformers), so the conversion's
own share can be compared with the largest input file.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from loc3r.bench.memory import child_peak_rss
from loc3r.models.cut3r import Cut3rConfig, official_model_line, random_state_dict, save_official_checkpoint
from loc3r.models.tokenizer import train_tiny_tokenizer

SHARDS = 4
LIMIT = 1.5  # peak above baseline must stay below LIMIT x the largest input file
TOWER = dict(hidden=1152, intermediate=4304, stored_layers=26, patches=729, patch=14)
LLM = dict(vocab_size=32000, hidden_size=1536, intermediate_size=8960, num_hidden_layers=10,
           num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
           rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
CONVERT = "import sys; from loc3r.models.convert_cli import main; code = main(sys.argv[1:])\nif code: sys.exit(code)"
IMPORT_ONLY = "import loc3r.models.convert_bundle, loc3r.models.cut3r"


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


CUT3R_VARIANTS = {"tiny": Cut3rConfig.tiny(), "real-size 512 DPT (random weights)": Cut3rConfig.real_512_dpt()}


def report(shards: list[int], runs: dict[str, tuple[int, float, int, list[int]]], baseline: int) -> str:
    """Markdown; ``runs``: CUT3R variant -> (peak RSS, seconds, CUT3R file bytes, output shard bytes)."""
    mb = 1e6
    params = sum(math.prod(s) for s in checkpoint_shapes().values())
    lines = [
        "# loc3r-convert peak memory",
        "",
        f"Generated by `python -m loc3r.bench.convert_memory` on {time.strftime('%Y-%m-%d')}. Do not edit by hand.",
        "",
        f"Synthetic LLaVA-NeXT checkpoint: {params / 1e9:.2f} B parameters, bf16, {len(shards)} safetensors shards "
        f"({', '.join(f'{s / mb:.0f}' for s in shards)} MB, {sum(shards) / mb:.0f} MB in all); SigLIP so400m "
        f"(26 stored layers), Qwen2 {LLM['hidden_size']} wide x {LLM['num_hidden_layers']} layers. Converted "
        "with the default options (output shards <= 2000 MB, dtypes kept) once per CUT3R checkpoint. "
        f"Baseline: an import-only subprocess (torch, transformers, loc3r) peaks at {baseline / mb:.0f} MB. "
        f"Own share = peak - baseline; budget {LIMIT} x the largest input file (a LLaVA shard, or the "
        "CUT3R `.pth`, which is one file).",
        "",
        "| CUT3R | CUT3R file MB | output shards MB | peak RSS MB | own share MB | / largest input file | budget | time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, (peak, seconds, cut3r_bytes, out_files) in runs.items():
        ratio = (peak - baseline) / max(*shards, cut3r_bytes)
        lines.append(
            f"| {variant} | {cut3r_bytes / mb:.0f} | {' + '.join(f'{s / mb:.0f}' for s in out_files)} | {peak / mb:.0f} "
            f"| {(peak - baseline) / mb:.0f} | {ratio:.2f} | {'pass' if ratio <= LIMIT else 'over'} | {seconds:.1f} |"
        )
    lines += [
        "",
        "Peak RSS is the subprocess's `VmHWM` (/proc) and counts the memory-mapped pages of the file being read: "
        "LLaVA tensors are read one source shard at a time, while `load_cut3r` maps the whole CUT3R camera path, "
        "whose pages stay resident until the last of its tensors is written (they are clean file pages, "
        "reclaimable under memory pressure). They are written first and released before the LLaVA shards are "
        "read, so the peak is the larger of the two, not their sum.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_memory", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints and bundles, ~12 GB (default: a temp dir)")
    args = parser.parse_args(argv)
    runs: dict[str, tuple[int, float, int, list[int]]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        (work / "llava").mkdir()
        shards = fabricate(work / "llava")
        baseline, _ = child_peak_rss(IMPORT_ONLY)
        for k, (variant, config) in enumerate(CUT3R_VARIANTS.items()):
            cut3r, bundle = work / f"cut3r_{k}.pth", work / f"bundle_{k}"
            save_official_checkpoint(random_state_dict(config, seed=0), official_model_line(config), cut3r)
            peak, seconds = child_peak_rss(CONVERT, ["--llava", str(work / "llava"), "--cut3r", str(cut3r), "--out", str(bundle)])
            out_files = [f.stat().st_size for f in sorted(bundle.glob("*.safetensors"))]
            runs[variant] = (peak, seconds, cut3r.stat().st_size, out_files)
        text = report(shards, runs, baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert_memory.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
