"""Peak memory of ``loc3r-convert`` on a synthetic ~1B-parameter LLaVA-NeXT checkpoint.

Run: ``python -m loc3r.bench.convert_memory [--out benchmarks/results] [--workdir DIR]`` (the
``.md`` and a ``.json`` with the provenance record).
The checkpoint (SigLIP so400m tower as LLaVA-NeXT saves it, 26 layers; a Qwen2 with 1536
width and 10 layers; bf16; ``loc3r.bench.fabricate``) is written tensor by tensor into 4
safetensors files, so the fabrication never holds more than one tensor. It is converted twice in a subprocess, with
a tiny CUT3R and with a real-size one (random weights); peak RSS is the child's ``VmHWM``.
An import-only subprocess gives the baseline (torch + transformers), so the conversion's
own share can be compared with the largest input file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loc3r.bench.fabricate import LLAVA_VIDEO_7B_QWEN2, TowerSizes, llava_next_shapes, parameter_count, write_cut3r_pth, write_llava_next
from loc3r.bench.memory import child_peak_rss
from loc3r.bench.provenance import header, outside_results, start
from loc3r.fileio import atomic_file, write_json_atomic
from loc3r.models.cut3r import Cut3rConfig

SHARDS = 4
LIMIT = 1.5  # peak above baseline must stay below LIMIT x the largest input file
LLM = dict(vocab_size=32000, hidden_size=1536, intermediate_size=8960, num_hidden_layers=10,
           num_attention_heads=12, num_key_value_heads=2)
TOKENIZER_SIZE = 31_000  # leaves rows for the chat tokens and <Pos>/<Ori>
CONVERT = "import sys; from loc3r.models.convert_cli import main; code = main(sys.argv[1:])\nif code: sys.exit(code)"
IMPORT_ONLY = "import loc3r.models.convert_bundle, loc3r.models.cut3r"


def checkpoint_config() -> dict[str, object]:
    """The synthetic checkpoint's config.json: LLaVA-Video's fields, a smaller Qwen2."""
    return {**LLAVA_VIDEO_7B_QWEN2, **LLM}


def fabricate(folder: Path) -> list[int]:
    """Write the checkpoint (config, tokenizer files, bf16 shards + index); returns shard sizes."""
    total = parameter_count(llava_next_shapes(checkpoint_config(), TowerSizes())) * 2
    files = write_llava_next(folder, checkpoint_config(), tokenizer_size=TOKENIZER_SIZE, max_shard_bytes=-(-total // SHARDS))
    return [f.stat().st_size for f in files]


CUT3R_VARIANTS = {"tiny": Cut3rConfig.tiny(), "real-size 512 DPT (random weights)": Cut3rConfig.real_512_dpt()}


def report(shards: list[int], runs: dict[str, tuple[int, float, int, list[int]]], baseline: int, record: dict[str, Any]) -> str:
    """Markdown; ``runs``: CUT3R variant -> (peak RSS, seconds, CUT3R file bytes, output shard bytes)."""
    mb = 1e6
    params = parameter_count(llava_next_shapes(checkpoint_config(), TowerSizes()))
    lines = [
        "# loc3r-convert peak memory",
        "",
        *header(record),
        "",
        "Written by the command above; do not edit by hand. Peak memory does not depend on the load.",
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
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.convert_memory", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints and bundles, ~12 GB (default: a temp dir)")
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    command = ["python", "-m", "loc3r.bench.convert_memory", *(sys.argv[1:] if argv is None else argv)]
    recording = start("convert_memory", command, "none: one conversion per CUT3R checkpoint, each a fresh process (peak memory)",
                      1, args.allow_unreachable or outside_results(args.out / "convert_memory.json"))
    runs: dict[str, tuple[int, float, int, list[int]]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        (work / "llava").mkdir()
        shards = fabricate(work / "llava")
        baseline, _ = child_peak_rss(IMPORT_ONLY)
        for k, (variant, config) in enumerate(CUT3R_VARIANTS.items()):
            cut3r, bundle = work / f"cut3r_{k}.pth", work / f"bundle_{k}"
            write_cut3r_pth(cut3r, config)
            peak, seconds = child_peak_rss(CONVERT, ["--llava", str(work / "llava"), "--cut3r", str(cut3r), "--out", str(bundle)])
            out_files = [f.stat().st_size for f in sorted(bundle.glob("*.safetensors"))]
            runs[variant] = (peak, seconds, cut3r.stat().st_size, out_files)
    record = recording.finish()
    text = report(shards, runs, baseline, record)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "convert_memory.json", {"provenance": record, "shards_bytes": shards, "baseline_peak_rss_bytes": baseline,
                                                         "runs": {variant: dict(zip(("peak_rss_bytes", "wall_s", "cut3r_file_bytes",
                                                                                     "output_shards_bytes"), run, strict=True))
                                                                  for variant, run in runs.items()}})
    with atomic_file(args.out / "convert_memory.md") as stream:
        stream.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
