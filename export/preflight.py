"""Everything ``loc3r-export`` needs, checked before any graph is exported.

A missing extra, a full disk or a target the model cannot fit must not surface after
minutes of exporting: each requirement of the chosen target and options is checked here,
and every problem found is reported at once, one line each, with its fix.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from loc3r.errors import InputError, Loc3rError, Problems

GIB = 2**30
DISK_MARGIN = 1.1  # the predicted file sizes leave out ONNX headers and the LLM builder's own files

# module -> (what needs it, the install line)
ONNXRUNTIME = ("onnxruntime", "the parity checks run every graph in ONNX Runtime", "pip install 'loc3r[cpu]'")


@dataclass(frozen=True)
class Checked:
    """What passed: the export request and a line saying what was checked."""

    request: object  # loc3r.export.exporter.ExportRequest (imported lazily: torch)
    summary: str


def preflight(args: argparse.Namespace) -> Checked:
    """The export request for ``args``, or :class:`Problems` naming every requirement unmet."""
    from loc3r.engines.targets import load_target
    from loc3r.export.llm import check_builder
    from loc3r.export.manifest import EXPORT_KIND
    from loc3r.fileio import check_replaceable
    from loc3r.models.bundle import load_bundle
    from loc3r.models.tiny import resolve_model

    problems: list[Loc3rError] = []

    def attempt(check):  # noqa: ANN001, ANN202 - a thunk and its value
        try:
            return check()
        except Loc3rError as exc:
            problems.append(exc)
            return None

    out = attempt(lambda: check_replaceable(args.out, EXPORT_KIND))
    if out is not None:
        attempt(lambda: check_writable(out))
    if args.context_tokens is not None and args.context_tokens < 1:
        problems.append(InputError(f"--context-tokens {args.context_tokens} must be positive", "e.g. --context-tokens 8192"))
    target = attempt(lambda: load_target(args.target))
    bundle = attempt(lambda: load_bundle(resolve_model(args.model)))
    llm = args.llm or (target.llm.weights if target else None)
    module, need, fix = ONNXRUNTIME
    if importlib.util.find_spec(module) is None:
        problems.append(InputError(f"{module} is not installed and {need}", fix))
    if llm not in (None, "none"):
        attempt(lambda: check_builder(args.builder_python))
    if target is None or bundle is None:
        raise Problems(problems)
    request = attempt(lambda: export_request(args, target, bundle, llm))
    summary = attempt(lambda: check_resources(request, out)) if request is not None and out is not None else None
    if problems:
        raise Problems(problems)
    return Checked(request, summary or "")


def check_writable(out: Path) -> None:
    """``out`` (or the folder it will be made in) is a folder this user can write."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"--out {out}: {existing} is not a folder", "pass --out inside a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {existing} cannot be written (permission denied)", "pass --out in a folder you can write to")


def export_request(args: argparse.Namespace, target, bundle, llm: str):  # noqa: ANN001, ANN201 - Target, Bundle, ExportRequest
    """The request, its LLM form checked against the target (``--llm fp16`` has no CPU form)."""
    from loc3r.export.cli import parse_vggt_size
    from loc3r.export.exporter import ExportRequest
    from loc3r.export.llm import llm_form

    if llm != "none":
        llm_form(target, llm)
    encoders = args.encoders or target.encoders.default
    calibration = export_calibration(args, target, bundle, encoders)
    return ExportRequest(
        bundle=bundle,
        target=target,
        out_dir=Path(args.out),
        llm_quant=None if llm == "none" else llm,
        vggt_size=parse_vggt_size(args.vggt_size, bundle),
        context_tokens=args.context_tokens,
        builder_python=getattr(args, "builder_python", None),
        encoders=encoders,
        calibration=calibration,
    )


def export_calibration(args: argparse.Namespace, target, bundle, encoders: str):  # noqa: ANN001, ANN201 - Target, Bundle, CalibrationSet
    """The calibration frames of ``--calibration`` (TensorRT targets' int8), decoded and
    preprocessed now; None where the export needs none. Each misuse is a one-line error."""
    videos = getattr(args, "calibration", None) or []
    calibrated = encoders == "int8" and target.encoders.int8_needs_calibration
    if videos and not calibrated:
        where = "without --encoders int8" if encoders != "int8" else f"on {target.name}, whose int8 is calibration-free"
        raise InputError(f"--calibration is for --encoders int8 on TensorRT targets, not {where}", "drop --calibration")
    if not calibrated:
        return None
    if not videos:
        raise InputError(
            f"--encoders int8 on {target.name} builds INT8 TensorRT engines from frames of your own videos, and no --calibration was given",
            "add --calibration VIDEO [VIDEO...] (videos like the ones you will ask about), or export without --encoders int8 (FP16 engines)",
        )
    if bundle.config.encoder_3d != "cut3r":
        raise InputError(f"--calibration calibrates CUT3R and SigLIP; {bundle.config.model_id} uses {bundle.config.encoder_3d}", "export without --encoders int8")
    from loc3r.export.qdq import read_calibration

    return read_calibration(videos, bundle.config)


def check_resources(request, out: Path) -> str:  # noqa: ANN001 - ExportRequest
    """The memory plan (predicted from config.json) and the disk space the files need; a
    line saying both, or :class:`Problems`."""
    from loc3r.export.exporter import check_plan, plan_of
    from loc3r.export.llm import llm_form
    from loc3r.export.memory_plan import predicted_weights

    form = llm_form(request.target, request.llm_quant) if request.llm_quant else None
    weights = predicted_weights(request.bundle.config, request.target, form)
    plan = plan_of(request, weights, form, "predicted from config.json")
    problems: list[Loc3rError] = []
    try:
        check_plan(request, plan)
    except InputError as exc:
        problems.append(exc)
    need = disk_need(weights, request.fp16)
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        problems.append(InputError(
            f"--out {out}: the export writes about {need / GIB:.2f} GiB, but {free / GIB:.2f} GiB is free on {existing}'s disk",
            "free some space, or pass --out on another disk",
        ))
    if problems:
        raise Problems(problems)
    return (
        f"target {request.target.name}, LLM {request.llm_quant or 'left out'}: memory plan {plan.total / GIB:.2f} of "
        f"{plan.budget / GIB:.2f} GiB, about {need / GIB:.2f} GiB to write ({free / GIB:.1f} GiB free)"
    )


def disk_need(weights: dict, fp16: bool) -> int:  # noqa: ANN001 - name -> memory_plan.Weights
    """Bytes the export writes: every artifact's file, and FP16 copies of the graphs on FP16 targets."""
    total = sum(w.disk for w in weights.values())
    if fp16:
        total += sum(w.disk // 2 for name, w in weights.items() if not name.startswith("llm "))
    return int(total * DISK_MARGIN)
