"""Peak RSS of the LLM export at Qwen2-7B's real widths, with few layers, extrapolated to 28.

    python -m loc3r.bench.llm_export_memory [--out benchmarks/results] [--cases 1:32000 ...] [--no-builder]

Each case writes a random bf16 checkpoint with Qwen2-7B's widths (hidden 3584, MLP 18944,
28/4 heads) and ``layers`` layers and ``vocab`` rows (Hugging Face layout, 2 GB shards),
then builds the decoder in a fresh process and reads that process's ``VmHWM``:

- ``loc3r``: :mod:`loc3r.export.llm_build` as ``loc3r-export`` runs it (weights memory-
  mapped and handed back, int4 quantized one weight at a time);
- ``builder``: onnxruntime-genai's own command line on the same checkpoint and options
  (``python -m onnxruntime_genai.models.builder``), for comparison.

Forms: the jetson-orin target's (cuda, int4 block 128, fp16 lm_head) and the cpu target's
(cpu, fp32). The 28-layer, 152064-vocab figure is extrapolated linearly, not measured: per-layer
slope from 1 -> 2 layers, vocabulary term from 32000 -> 152064 rows at 1 layer (only when all
three cases ran). Peak memory does not depend on load; the record states it anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loc3r.bench.provenance import Recording, header, start
from loc3r.fileio import atomic_file, write_json_atomic

WIDTHS = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4}
CASES = ((1, 32000), (2, 32000), (1, 152064))
FORMS = {
    "jetson-orin (cuda int4, lm_head fp16)": ("cuda", "int4", "fp16", 128),
    "cpu (fp32)": ("cpu", "fp32", "fp32", 32),
}
REAL_LAYERS, REAL_VOCAB = 28, 152064
_PEAK = "print(json.dumps({'peak_gib': next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 2**20}))"


def write_checkpoint(folder: Path, layers: int, vocab: int) -> None:
    """Random bf16 weights (N(0, 0.02)) in the Hugging Face Qwen2 layout."""
    code = f"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
config = Qwen2Config(vocab_size={vocab}, num_hidden_layers={layers}, max_position_embeddings=32768,
                     rope_theta=1e6, tie_word_embeddings=False, dtype="bfloat16", **{WIDTHS!r})
with torch.device("meta"):
    model = Qwen2ForCausalLM(config)
model = model.to_empty(device="cpu").to(torch.bfloat16)
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.save_pretrained({str(folder)!r}, max_shard_size="2GB")
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _peak(code: str) -> float:
    done = subprocess.run([sys.executable, "-c", f"import json\n{code}\n{_PEAK}"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_gib"]


def loc3r_peak(checkpoint: Path, out: Path, layers: int, vocab: int, form: tuple[str, str, str, int]) -> float:
    from loc3r.export.llm_build import BuildSpec
    from loc3r.models.config import LLMConfig

    provider, body, head, block = form
    config = LLMConfig(vocab_size=vocab, num_hidden_layers=layers, **WIDTHS)
    spec = BuildSpec(
        dataclasses.asdict(config), sorted(str(f) for f in checkpoint.glob("*.safetensors")), "", str(out), provider,
        "fp32" if provider == "cpu" else "fp16", body, head, block, True, 4 if provider == "cpu" else None,
    )
    spec.save(out.with_suffix(".json"))
    return _peak(f"from loc3r.export.llm_build import main\nmain([{str(out.with_suffix('.json'))!r}])")


def builder_peak(checkpoint: Path, out: Path, form: tuple[str, str, str, int]) -> float:
    provider, body, head, block = form
    options = ["exclude_embeds=true", "include_hidden_states=true", "prune_lm_head=true", f"block_size={block}"]
    if body == "int4" and head == "fp16":
        options.append("nodes_to_exclude=/lm_head/MatMul")
    argv = ["builder", "-i", str(checkpoint), "-o", str(out), "-p", body, "-e", provider, "-c", str(out) + ".cache",
            "--extra_options", *options]
    return _peak(f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')")


def extrapolate(peaks: dict[tuple[int, int], float]) -> float:
    per_layer = peaks[(2, 32000)] - peaks[(1, 32000)]
    return peaks[(1, REAL_VOCAB)] + (REAL_LAYERS - 1) * per_layer


def parse_case(text: str) -> tuple[int, int]:
    """``LAYERS:VOCAB`` (e.g. ``1:32000``) as a case."""
    try:
        layers, vocab = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYERS:VOCAB (e.g. 1:32000)") from None
    if layers < 1 or vocab < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: layers and vocab must be at least 1")
    return layers, vocab


def run(with_builder: bool, cases: Sequence[tuple[int, int]], recording: Recording) -> dict[str, Any]:
    """Each case's peak per form and exporter, one fresh process each; the 28-layer line
    when the three cases of ``CASES`` ran."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="loc3r-export-memory-") as tmp:
        for layers, vocab in cases:
            checkpoint = Path(tmp) / f"ckpt_{layers}_{vocab}"
            write_checkpoint(checkpoint, layers, vocab)
            for name, form in FORMS.items():
                out = Path(tmp) / f"out_{layers}_{vocab}_{form[0]}"
                case = f"{layers} layers, vocab {vocab}"
                rows.setdefault(name, {}).setdefault("loc3r", {})[case] = loc3r_peak(checkpoint, out, layers, vocab, form)
                subprocess.run(["rm", "-rf", str(out)], check=True)
                if with_builder:
                    rows[name].setdefault("builder", {})[case] = builder_peak(checkpoint, out, form)
                    subprocess.run(["rm", "-rf", str(out), str(out) + ".cache"], check=True)
            subprocess.run(["rm", "-rf", str(checkpoint)], check=True)
    for tools in rows.values():
        for measured in tools.values():
            peaks = {(int(k.split()[0]), int(k.split()[-1])): v for k, v in measured.items()}
            if all(case in peaks for case in CASES):
                measured[f"{REAL_LAYERS} layers, vocab {REAL_VOCAB} (extrapolated)"] = extrapolate(peaks)
    return {"provenance": recording.finish(), "widths": WIDTHS, "peak_rss_gib": rows}


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# LLM export: peak RSS at Qwen2-7B widths",
        "",
        *header(result["provenance"]),
        "",
        "**Extrapolated, not measured:** every 28-layer row is a straight line through the 1- and 2-layer points "
        "(the 1-layer full-vocabulary figure + 27 x the 1 -> 2 layer slope); only the 1- and 2-layer rows are measurements.",
        "",
        "| form | exporter | case | peak RSS GiB |",
        "| --- | --- | --- | --- |",
    ]
    for form, tools in result["peak_rss_gib"].items():
        for tool, cases in tools.items():
            for case, peak in cases.items():
                lines.append(f"| {form} | {tool} | {case} | {peak:.2f} |")
    lines += ["", NOTES]
    return "\n".join(lines)


NOTES = """\
Checkpoints: random bf16, Qwen2-7B's widths (hidden 3584, MLP 18944, 28/4 heads), 1 or 2
layers, 32000 or 152064 vocabulary rows, Hugging Face layout in 2 GB shards. Each export
ran in a fresh process, one after another (peak memory does not depend on the order or the
load); peak RSS is that process's own `VmHWM`, read by itself at its end.

- `loc3r`: `loc3r.export.llm_build` as `loc3r-export` runs it: the weights are
  memory-mapped views of the checkpoint's files whose pages are returned after use, and
  each weight is quantized on its own with onnxruntime's quantizer.
- `builder`: onnxruntime-genai's own command line on the same checkpoint and options; it
  loads the whole model through `AutoModelForCausalLM.from_pretrained`.
- Not measured at 28 layers: that needs a 15 GB checkpoint and ~40 min on this shared
  2-core machine (`benchmarks/real_size.py` runs it).
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.llm_export_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-builder", action="store_true", help="skip the builder's own command line")
    parser.add_argument("--cases", nargs="+", type=parse_case, default=list(CASES), metavar="LAYERS:VOCAB",
                        help="checkpoints to export (default 1:32000 2:32000 1:152064, the three the 28-layer line needs)")
    parser.add_argument("--allow-unreachable", action="store_true", help="measure code not on main (the result says so)")
    args = parser.parse_args(argv)
    command = ["python", "-m", "loc3r.bench.llm_export_memory", *(argv if argv is not None else sys.argv[1:])]
    recording = start("llm_export_memory", command, "one case and exporter at a time, each a fresh process "
                      "(peak memory: order and load do not change it)", 1, args.allow_unreachable)
    result = run(not args.no_builder, args.cases, recording)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "llm_export_memory.json", result)
    with atomic_file(args.out / "llm_export_memory.md") as stream:
        stream.write(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
