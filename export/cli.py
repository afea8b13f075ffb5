"""``loc3r-export``: ONNX graphs + manifest for a target; ``loc3r-export build`` on the device."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from loc3r.cli_support import ArgumentParser, run_cli
from loc3r.errors import InputError

PROG = "loc3r-export"
LLM_FORMATS = ("fp32", "fp16", "int8", "int4", "none")


def export_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Export Loc3R-VLM for a target: ONNX graphs (CUT3R step + f_cam, vision, heads) "
        "with parity measured against PyTorch, the LLM in a quantized form, and manifest.json. "
        "TensorRT engines are built on the device: 'loc3r-export build --manifest DIR/manifest.json'.",
    )
    parser.add_argument("--model", default="tiny", help="bundle folder, or 'tiny'")
    parser.add_argument("--target", required=True, help="target profile (see engines/*.toml), e.g. jetson-orin, cpu")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--cut3r-size", metavar="HxW", help="CUT3R input size, multiples of 16 (default: 4:3 landscape at the model's long side)")
    parser.add_argument("--llm", choices=LLM_FORMATS, help="LLM weight format (default: the target's)")
    parser.add_argument(
        "--context-tokens", type=int, metavar="N",
        help="the LLM's context limit: its KV cache is allocated for N tokens (default: the target's max_context_tokens)",
    )
    parser.add_argument("--debug", action="store_true")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=f"{PROG} build", description="Build the TensorRT engines a manifest plans (on the target device).")
    parser.add_argument("--manifest", required=True, help="manifest.json written by loc3r-export (or its folder)")
    parser.add_argument("--debug", action="store_true")
    return parser


def parse_size(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if text is None:
        return default
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--cut3r-size {text!r} is not HxW", "write it like 384x512") from None
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise InputError(f"--cut3r-size {text} must be positive multiples of 16", "e.g. 384x512 or 512x384")
    return height, width


def check_out(out: Path) -> None:
    """``--out`` is replaced as a whole: a new folder, an empty one, or an earlier export."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder", "pass a new folder for the export")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise InputError(
            f"--out {out} is a non-empty folder that is not a loc3r export; it would be replaced",
            "pass a new or empty folder",
        )


def run_export(args: argparse.Namespace) -> int:
    check_out(Path(args.out))
    if args.context_tokens is not None and args.context_tokens < 1:
        raise InputError(f"--context-tokens {args.context_tokens} must be positive", "e.g. --context-tokens 8192")
    from loc3r.engines.targets import load_target
    from loc3r.export.exporter import ExportRequest, default_cut3r_size, export_all
    from loc3r.models.bundle import load_bundle
    from loc3r.models.tiny import resolve_model

    target = load_target(args.target)
    bundle = load_bundle(resolve_model(args.model))
    llm = args.llm or target.llm.weights
    request = ExportRequest(
        bundle=bundle,
        target=target,
        out_dir=Path(args.out),
        cut3r_size=parse_size(args.cut3r_size, default_cut3r_size(bundle.config.cut3r_long_side)),
        llm_quant=None if llm == "none" else llm,
        context_tokens=args.context_tokens,
    )
    manifest = export_all(request, progress=lambda m: print(m, file=sys.stderr))
    print(f"wrote {manifest.root} for target {target.name} ({manifest.precision})")
    for name, artifact in manifest.artifacts.items():
        parity = artifact["parity"]
        print(f"  {artifact['file']:<22} parity vs PyTorch: max abs {parity['max_abs']:.2e} over {parity['runs']} run(s)")
    llm_part = manifest.data.get("llm")
    if llm_part:
        quant, form = llm_part["quantization"], llm_part["form"]
        print(
            f"  llm/                   {quant['layers']} layers, lm_head {quant['lm_head']}, {form['provider']} form, "
            f"KV {form['kv_cache']} for {llm_part['context_tokens']} tokens"
        )
        parity = llm_part["parity"]
        if parity and "skipped" in parity:
            print(f"  llm/                   parity vs PyTorch skipped: {parity['skipped']}")
        elif parity:
            print(f"  llm/                   parity vs PyTorch: max abs logits {parity['max_abs_logits']:.2e}, hidden {parity['max_abs_hidden']:.2e}")
    memory = manifest.data["memory_plan"]
    print(f"memory plan: {memory['total_bytes'] / 2**30:.2f} GiB of {memory['budget_bytes'] / 2**30:.2f} GiB on {memory['target']}")
    if bundle.config.random_weights:
        print(f"NOTE: {bundle.config.model_id} has RANDOM weights; the artifacts are for testing the toolchain only")
    plan = manifest.data.get("device_build")
    if plan and device_can_build(plan["sm"]):
        from loc3r.export.device_build import build_from_manifest

        manifest = build_from_manifest(manifest.root, progress=lambda m: print(m, file=sys.stderr))
        print(f"built {len(manifest.data['engines']['files'])} TensorRT engines on this GPU")
    elif plan:
        print(
            f"TensorRT engines are NOT built here: they are specific to the GPU (sm_{plan['sm']}) and TensorRT "
            f"{plan['trt_version']}. Copy {manifest.root} to the device and run there:\n"
            f"  loc3r-export build --manifest {manifest.root}/manifest.json\n"
            f"(or the trtexec lines under device_build.engines in manifest.json)"
        )
    return 0


def device_can_build(sm: str) -> bool:
    """True when TensorRT imports and a CUDA GPU of compute capability ``sm`` is present."""
    try:
        from loc3r.export.tensorrt_build import cuda_device_sm, import_tensorrt

        import_tensorrt()
        return cuda_device_sm() == sm
    except InputError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:
        args = build_parser().parse_args(argv[1:])

        def body() -> int:
            from loc3r.export.device_build import build_from_manifest

            manifest = build_from_manifest(args.manifest, progress=lambda m: print(m, file=sys.stderr))
            print(f"built {len(manifest.data['engines']['files'])} engines in {manifest.root}")
            return 0

        return run_cli(f"{PROG} build", body, args.debug)
    args = export_parser().parse_args(argv)
    return run_cli(PROG, lambda: run_export(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
