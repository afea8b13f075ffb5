"""torch -> ONNX for one declared graph, and the ONNX Runtime parity check."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from loc3r.errors import InternalError
from loc3r.export.graphs import GraphSpec
from loc3r.runtime.ort import open_session

OPSET = 18
#: CPU targets' opset: torch's exporter writes ``scaled_dot_product_attention`` as one ONNX
#: ``Attention`` node from opset 23 (one ONNX Runtime kernel instead of MatMul, Softmax,
#: MatMul); TensorRT targets keep OPSET (JetPack 6's TensorRT 10.3 predates opset 23)
FUSED_ATTENTION_OPSET = 23


@dataclass(frozen=True)
class ParityResult:
    """Worst error of ONNX Runtime against PyTorch over every output and every run.

    ``within_tolerance``: every element satisfied ``|got - ref| <= atol * scale + rtol * |ref|``,
    ``scale`` being the output's largest magnitude when above 1 (else 1): an output that has
    grown to tens (CUT3R's recurrent memory after a few frames) carries absolute rounding
    errors in proportion, including CroCo's float16 rounding of q and k, which can flip by
    one float16 step between two correct implementations.
    """

    max_abs: float
    max_rel: float
    runs: int
    within_tolerance: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "runs": self.runs, "within_tolerance": self.within_tolerance}


def export_onnx(module: nn.Module, spec: GraphSpec, example: Sequence[Tensor], path: Path, opset: int = OPSET) -> Path:
    """Export ``module`` at ``opset`` with ``spec``'s names and dynamic axes; check the model.

    Weights go to ``<file>.data`` beside the graph (ONNX external data): a protobuf file
    cannot exceed 2 GB, and CUT3R's step at 512 DPT size holds ~2.2 GB of float32 weights.
    """
    module.eval()
    with quiet_exporter():
        torch.onnx.export(
            module,
            tuple(example),
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes(spec),
            opset_version=opset,
            dynamo=True,
            external_data=True,
            verbose=False,
        )
    name_dynamic_axes(path, spec)
    onnx.checker.check_model(str(path))
    return path


def fused_attention_nodes(path: Path) -> int:
    """How many ONNX ``Attention`` nodes (fused attention, opset 23) ``path``'s graph holds."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(node.op_type == "Attention" and node.domain in ("", "ai.onnx") for node in model.graph.node)


def external_data_file(path: Path) -> Path | None:
    """The external data file ``path``'s initializers point to, if any (one per graph here)."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
    if len(locations) > 1:
        raise InternalError(f"{path.name} spreads its weights over {len(locations)} files", "this is an exporter bug; report it")
    return path.parent / locations.pop() if locations else None
def dynamic_shapes(spec: GraphSpec) -> dict[str, dict[int, Any] | None]:
    """torch.export dimensions for the spec's named axes: one ``Dim`` per name (shared by
    every tensor that has it), a multiple of the size ``axis_multiples`` gives."""
    multiples = dict(spec.axis_multiples)
    dims: dict[str, Any] = {}
    for tensor in spec.inputs:
        for dim in tensor.shape:
            if isinstance(dim, str) and dim not in dims:
                step = multiples.get(dim, 1)
                dims[dim] = step * torch.export.Dim(f"{dim}_blocks", min=1) if step > 1 else torch.export.Dim(dim, min=1)
    return {
        t.name: {axis: dims[dim] for axis, dim in enumerate(t.shape) if isinstance(dim, str)} or None for t in spec.inputs
    }


def name_dynamic_axes(path: Path, spec: GraphSpec) -> None:
    """Give the graph's inputs and outputs the spec's axis names (the exporter writes its own
    symbols, such as ``16*height_blocks``), so the ONNX file reads as the manifest does."""
    model = onnx.load(str(path), load_external_data=False)  # the weights stay in their data file
    declared = {t.name: t.shape for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, declared[value.name], strict=True):
            fixed = dim.dim_value if dim.HasField("dim_value") else None
            if isinstance(want, str) and fixed is None:
                dim.dim_param = want
            elif fixed != want:
                raise InternalError(f"{spec.name}: the exporter made {value.name} {fixed or dim.dim_param!r} where the spec says {want!r}")
    onnx.save(model, str(path))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Hide torch.onnx's progress prints, warnings and log chatter for the block."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Silence a library logger's warnings (the exporter's chatter) for the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def compare(spec: GraphSpec, expected: Sequence[Tensor | np.ndarray], actual: Sequence[np.ndarray]) -> ParityResult:
    """Max absolute and relative error over a set of outputs, and the allclose verdict."""
    max_abs = max_rel = 0.0
    ok = True
    for ref, got in zip(expected, actual, strict=True):
        ref_np = ref.detach().float().numpy() if isinstance(ref, Tensor) else np.asarray(ref, dtype=np.float32)
        if ref_np.shape != got.shape:
            raise InternalError(f"{spec.name}: ONNX output shape {got.shape} != PyTorch {ref_np.shape}")
        diff = np.abs(ref_np - got)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_rel = max(max_rel, float((diff / (np.abs(ref_np) + 1e-6)).max(initial=0.0)))
        scale = max(1.0, float(np.abs(ref_np).max(initial=0.0)))
        ok = ok and bool((diff <= spec.atol * scale + spec.rtol * np.abs(ref_np)).all())
    return ParityResult(max_abs, max_rel, 1, ok)


def merge(results: Sequence[ParityResult]) -> ParityResult:
    """The worst of several parity results."""
    return ParityResult(
        max(r.max_abs for r in results),
        max(r.max_rel for r in results),
        sum(r.runs for r in results),
        all(r.within_tolerance for r in results),
    )


def check_parity(
    module: nn.Module,
    spec: GraphSpec,
    path: Path,
    make_inputs: Callable[[int], Sequence[Tensor]],
    runs: int = 3,
) -> ParityResult:
    """Run PyTorch and ONNX Runtime on ``runs`` fresh inputs; fail if beyond tolerance."""
    pairs = paired_runs(module, spec, open_session(path), make_inputs, runs)
    return ensure_within(spec, merge([compare(spec, expected, actual) for expected, actual in pairs]))


def paired_runs(
    module: nn.Module, spec: GraphSpec, session: Any, make_inputs: Callable[[int], Sequence[Tensor]], runs: int
) -> list[tuple[tuple[Tensor, ...], list[np.ndarray]]]:
    """PyTorch's and ``session``'s outputs on ``runs`` fresh inputs."""
    pairs = []
    for run in range(runs):
        inputs = make_inputs(run)
        with torch.inference_mode():
            expected = as_tuple(module(*inputs))
        pairs.append((expected, session.run(spec.output_names, feeds(spec, inputs))))
    return pairs


def feeds(spec: GraphSpec, inputs: Sequence[Tensor]) -> dict[str, np.ndarray]:
    """ONNX Runtime input feed for ``inputs`` in the spec's order."""
    return {name: t.detach().numpy() for name, t in zip(spec.input_names, inputs, strict=True)}


def ensure_within(spec: GraphSpec, result: ParityResult) -> ParityResult:
    """Raise if any element was beyond the spec's tolerance."""
    if not result.within_tolerance:
        raise InternalError(
            f"{spec.name}: ONNX Runtime differs from PyTorch by {result.max_abs:.3g} abs / "
            f"{result.max_rel:.3g} rel (tolerance {spec.atol:g} abs or {spec.rtol:g} rel)",
            "this is an exporter bug; rerun with --debug and report it",
        )
    return result


def as_tuple(output: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (output,) if isinstance(output, Tensor) else tuple(output)
