"""``loc3r-export``: ONNX graphs + manifest for a target; ``loc3r-export build`` on the device."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from loc3r.cli_support import ArgumentParser, run_cli
from loc3r.errors import InputError
from loc3r.export.manifest import Manifest

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
    parser.add_argument("--llm", choices=LLM_FORMATS, help="LLM weight format (default: the target's)")
    parser.add_argument("--debug", action="store_true")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=f"{PROG} build", description="Build the TensorRT engines a manifest plans (on the target device).")
    parser.add_argument("--manifest", required=True, help="manifest.json written by loc3r-export (or its folder)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), help="override the manifest's precision (e.g. fp32 when FP16 fails the check)")
    parser.add_argument("--debug", action="store_true")
    return parser


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
    from loc3r.engines.targets import load_target
    from loc3r.export.exporter import ExportRequest, export_all
    from loc3r.models.bundle import load_bundle
    from loc3r.models.tiny import resolve_model

    target = load_target(args.target)
    bundle = load_bundle(resolve_model(args.model))
    llm = args.llm or target.llm.weights
    request = ExportRequest(
        bundle=bundle,
        target=target,
        out_dir=Path(args.out),
        llm_quant=None if llm == "none" else llm,
    )
    manifest = export_all(request, progress=lambda m: print(m, file=sys.stderr))
    print(f"wrote {manifest.root} for target {target.name} ({manifest.precision})")
    for name, artifact in manifest.artifacts.items():
        parity = artifact["parity"]
        line = f"  {artifact['file']:<22} parity vs PyTorch: max abs {parity['max_abs']:.2e} over {parity['runs']} run(s)"
        if "fp16" in artifact:
            line += f"; FP16 graph: {artifact['fp16']['error_vs_fp32']['relative']:.1e} of output scale"
        print(line)
    if manifest.data.get("llm"):
        quant = manifest.data["llm"]["quantization"]
        print(f"  llm/                   {quant['layers']} layers, lm_head {quant['lm_head']}")
    if bundle.config.random_weights:
        print(f"NOTE: {bundle.config.model_id} has RANDOM weights; the artifacts are for testing the toolchain only")
    plan = manifest.data.get("device_build")
    if plan and device_can_build(plan["sm"]):
        from loc3r.export.device_build import build_from_manifest

        manifest = build_from_manifest(manifest.root, progress=lambda m: print(m, file=sys.stderr))
        print_built(manifest)
    elif plan:
        print(device_step(manifest))
    return 0


def device_step(manifest: Manifest) -> str:
    """What to run on the device when the engines could not be built here."""
    plan = manifest.data["device_build"]
    return (
        f"TensorRT engines are NOT built here: they are specific to the GPU (planned: sm_{plan['sm']}) and the TensorRT "
        f"version (planned: {plan['trt_version']}). Copy {manifest.root} to the device and run there:\n"
        f"  loc3r-export build --manifest {manifest.root}/manifest.json\n"
        f"(or the trtexec lines under device_build.engines in manifest.json)"
    )


def device_can_build(sm: str) -> bool:
    """True when TensorRT imports and the GPU here has the planned compute capability ``sm``."""
    try:
        from loc3r.export.tensorrt_build import import_tensorrt
        from loc3r.runtime.cuda import gpu_info

        import_tensorrt()
        return gpu_info().sm == sm
    except InputError:
        return False


def print_built(manifest: Manifest) -> None:
    """The engines built, each with its error against ONNX Runtime FP32."""
    engines = manifest.data["engines"]
    print(f"built {len(engines['files'])} TensorRT {engines['trt_version']} engines for sm_{engines['sm']} in {manifest.root} ({engines['mode']})")
    for name, file in engines["files"].items():
        check = engines["check_vs_onnxruntime_fp32"][name]
        print(f"  {file:<40} vs ONNX Runtime FP32: {check['relative']:.1e} of output scale (tolerance {check['tolerance']:g})")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:
        args = build_parser().parse_args(argv[1:])

        def body() -> int:
            from loc3r.export.device_build import build_from_manifest

            manifest = build_from_manifest(args.manifest, progress=lambda m: print(m, file=sys.stderr), precision=args.precision)
            print_built(manifest)
            return 0

        return run_cli(f"{PROG} build", body, args.debug)
    args = export_parser().parse_args(argv)
    return run_cli(PROG, lambda: run_export(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
