"""``loc3r-export``: ONNX graphs + manifest for a target; ``loc3r-export build`` on the device."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from loc3r.cli_support import ArgumentParser, run_cli
from loc3r.errors import InputError
from loc3r.export.int8 import CALIBRATION_FRAMES_PER_VIDEO
from loc3r.export.manifest import Manifest

PROG = "loc3r-export"
LLM_FORMATS = ("fp32", "fp16", "int8", "int4", "none")


def export_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Export Loc3R-VLM for a target: ONNX graphs (3D encoder + f_cam: CUT3R step or VGGT clip; vision, heads) "
        "with parity measured against PyTorch, the LLM in a quantized form, and manifest.json. "
        "TensorRT engines are built on the device: 'loc3r-export build --manifest DIR/manifest.json'.",
    )
    parser.add_argument("--model", default="tiny", help="bundle folder, or 'tiny' / 'tiny-vggt'")
    parser.add_argument("--target", required=True, help=f"target profile: {target_names()}")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--vggt-size", metavar="HxW", help="VGGT input size (a VGGT bundle): W the model's img_size (518), "
                        "H a multiple of 14 up to W, as the video's aspect gives it (default: 4:3, 392x518)")
    parser.add_argument("--llm", choices=LLM_FORMATS, help="LLM weight format (default: the target's)")
    parser.add_argument("--encoders", choices=("fp32", "int8"),
                        help="precision of the encoders (CUT3R or VGGT, SigLIP): int8 adds 8-bit forms, each checked against "
                             "FP32 at export (default: the target's, see [encoders] in engines/TARGET.toml; fp32 overrides it)")
    parser.add_argument("--calibration", nargs="+", metavar="VIDEO",
                        help="with --encoders int8 on a TensorRT target: videos like the ones you will ask about; "
                             f"{CALIBRATION_FRAMES_PER_VIDEO} frames of each calibrate the INT8 (QDQ) graphs, every 4th is held out to check them")
    parser.add_argument(
        "--context-tokens", type=int, metavar="N",
        help="the LLM's context limit: its KV cache is allocated for N tokens (default: the target's max_context_tokens)",
    )
    parser.add_argument(
        "--builder-python", metavar="PYTHON",
        help="the Python that builds the LLM (a venv with loc3r[cpu,export]): for GPU installs, whose onnxruntime-gpu "
        "cannot sit beside onnxruntime-genai's CPU onnxruntime, and for Python 3.10, which it has no wheel for",
    )
    parser.add_argument("--debug", action="store_true")
    return parser


def target_names() -> str:
    """The shipped target profiles, and the aliases, for ``--help``."""
    from loc3r.engines.targets import ALIASES, list_targets

    return ", ".join(list_targets() + [f"{alias} (= {name})" for alias, name in ALIASES.items()])


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=f"{PROG} build", description="Build the TensorRT engines a manifest plans (on the target device).")
    parser.add_argument("--manifest", required=True, help="manifest.json written by loc3r-export (or its folder)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), help="override the manifest's precision (e.g. fp32 when FP16 fails the check)")
    parser.add_argument("--debug", action="store_true")
    return parser


def parse_size(text: str | None, default: tuple[int, int], flag: str, patch: int) -> tuple[int, int]:
    if text is None:
        return default
    example = "x".join(map(str, default))
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"{flag} {text!r} is not HxW", f"write it like {example}") from None
    if height <= 0 or width <= 0 or height % patch or width % patch:
        raise InputError(f"{flag} {text} must be positive multiples of {patch}", f"e.g. {example}")
    return height, width


def parse_vggt_size(text: str | None, bundle) -> tuple[int, int] | None:  # noqa: ANN001 - Bundle
    """``--vggt-size`` for a VGGT bundle: frames are always ``img_size`` wide (``vggt_input``)."""
    if bundle.config.encoder_3d != "vggt":
        if text is not None:
            raise InputError(f"--vggt-size is for VGGT bundles; {bundle.config.model_id} uses {bundle.config.encoder_3d}", "drop --vggt-size")
        return None
    from loc3r.export.exporter import default_vggt_size
    from loc3r.models.vggt import VggtConfig

    sizes = VggtConfig.from_dict(bundle.config.vggt)
    height, width = parse_size(text, default_vggt_size(sizes.img_size, sizes.patch_size), "--vggt-size", sizes.patch_size)
    if width != sizes.img_size or height > width:
        wide = round(sizes.img_size * 9 / 16 / sizes.patch_size) * sizes.patch_size
        raise InputError(f"--vggt-size {text}: VGGT frames are {sizes.img_size} wide and at most that high", f"e.g. {wide}x{sizes.img_size} for 16:9")
    return height, width


def run_export(args: argparse.Namespace) -> int:
    from loc3r.export.exporter import export_all
    from loc3r.export.preflight import preflight

    print(f"loading model {args.model} and checking what the export needs ...", file=sys.stderr, flush=True)
    checked = preflight(args)  # every requirement, before any work: each problem is a line
    request = checked.request
    target, bundle = request.target, request.bundle
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    say(f"checked: {checked.summary}")
    manifest = export_all(request, progress=say)
    print(f"wrote {manifest.root} for target {target.name} ({manifest.precision})")
    for name, artifact in manifest.artifacts.items():
        print(f"  {artifact['file']:<22} {graph_parity_line(artifact)}")
    llm_part = manifest.data.get("llm")
    if llm_part:
        quant, form = llm_part["quantization"], llm_part["form"]
        print(
            f"  llm/                   {quant['layers']} layers, lm_head {quant['lm_head']}, {form['provider']} form, "
            f"KV {form['kv_cache']} for {llm_part['context_tokens']} tokens"
        )
        if llm_part["parity"]:
            print(f"  llm/                   {llm_parity_line(llm_part['parity'])}")
    memory = manifest.data["memory_plan"]
    print(f"memory plan: {memory['total_bytes'] / 2**30:.2f} GiB of {memory['budget_bytes'] / 2**30:.2f} GiB on {memory['target']}")
    if bundle.config.random_weights:
        print(f"NOTE: {bundle.config.model_id} has RANDOM weights; the artifacts are for testing the toolchain only")
    plan = manifest.data.get("device_build")
    if plan and device_can_build(plan["sm"]):
        from loc3r.export.device_build import build_from_manifest

        manifest = build_from_manifest(manifest.root, progress=say)
        print_built(manifest)
    elif plan:
        print(device_step(manifest))
    else:
        print(f"next: loc3r-run VIDEO QUESTION --model {shlex.quote(str(args.model))} --backend onnxruntime --engines {shlex.quote(str(manifest.root))}")
    return 0


def graph_parity_line(artifact: dict) -> str:
    """A graph's parity against PyTorch with its tolerance and verdict (and its FP16 / INT8 graph's)."""
    parity, tolerance = artifact["parity"], artifact["tolerance"]
    verdict = "pass" if parity["within_tolerance"] else "FAIL"
    line = (
        f"parity vs PyTorch: max abs {parity['max_abs']:.2e} over {parity['runs']} run(s), "
        f"tolerance atol {tolerance['atol']:g} + rtol {tolerance['rtol']:g}: {verdict}"
    )
    for kind in ("fp16", "int8"):
        if kind in artifact:
            error = artifact[kind]["error_vs_fp32"]
            reduced_verdict = "pass" if error["within_tolerance"] else "FAIL"
            line += f"; {kind.upper()} graph: {error['relative']:.1e} of output scale, tolerance {error['tolerance']:g}: {reduced_verdict}"
    return line


def llm_parity_line(parity: dict) -> str:
    """The LLM probe against transformers: an exact (fp32) form is held to ``tolerance_fp32``;
    a quantized form differs by design: whether it picks the same first token is reported, not
    enforced (the export does not fail on it)."""
    if "skipped" in parity:
        return f"parity vs PyTorch skipped: {parity['skipped']}"
    errors = f"max abs logits {parity['max_abs_logits']:.2e}, hidden {parity['max_abs_hidden']:.2e}"
    if parity["exact_form"]:
        tolerance = parity["tolerance_fp32"]
        within = max(parity["max_abs_logits"], parity["max_abs_hidden"]) <= tolerance
        return f"parity vs PyTorch: {errors}, tolerance {tolerance:g} (fp32 form): {'pass' if within else 'FAIL'}"
    top1 = "same top-1 token" if parity["top1_match"] else (
        "top-1 token differs (reported, not a gate: quantization can flip near-tied logits, as random weights' are)")
    return f"parity vs PyTorch: {errors} (quantized: no elementwise tolerance), {top1}"


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
