"""Export the LLM: ``llm/decoder.onnx`` (+ external data), the embedding table, a manifest part.

The decoder is onnxruntime-genai's model builder's graph (:mod:`loc3r.export.llm_build`, run
in a subprocess). ``--llm`` maps onto it as follows; the float type and the KV cache follow
the target (``cuda`` form on GPU targets, ``cpu`` form on the CPU target):

==========  ==============================  ==================================
``--llm``   GPU targets (builder ``cuda``)   cpu target (builder ``cpu``)
==========  ==============================  ==================================
fp32        fp32 weights, I/O and KV         fp32 weights, I/O and KV (exact)
fp16        fp16 weights, I/O and KV         refused: no fp16 CPU kernels
int8        MatMulNBits 8-bit, fp16 I/O, KV  MatMulNBits 8-bit, fp32 I/O and KV
int4        MatMulNBits 4-bit, fp16 I/O, KV  MatMulNBits 4-bit, fp32 I/O and KV
==========  ==============================  ==================================

A float ``lm_head`` is kept in the graph's float type; an int one is quantized on its own
(e.g. int8 under int4 layers). The embedding table stays outside the graph: fp32 for the
fp32 form (the CPU reference is exact), fp16 otherwise.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM

from loc3r.engines.targets import Target
from loc3r.errors import InputError, InternalError
from loc3r.fileio import current_umask
from loc3r.export.llm_build import BUILDER_OPTIONS, BuildSpec, Provider
from loc3r.export.llm_io import DECODER, EMBED_TENSOR, EMBEDDINGS, LLM_DIR
from loc3r.export.llm_reference import reference_outputs
from loc3r.export.mapped_weights import MappedShards
from loc3r.export.quantize import Quant
from loc3r.models.bundle import Bundle, weight_files
from loc3r.models.config import LLMConfig

PARITY_TOKENS = (12, 4)  # one prefill, then a chunk on top of it
FP32_TOLERANCE = 1e-4
EMBED_NAME = "model.embed_tokens.weight"
BUNDLE_PREFIX = "llm."
LOG_TAIL = 20
INT_FORMATS = ("int8", "int4")


@dataclass(frozen=True)
class LLMForm:
    """How the decoder is built: where it runs, its weight formats and quantization blocks."""

    provider: Provider
    layers: Quant
    lm_head: Quant
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None  # MatMulNBits' CPU compute type; CUDA kernels ignore it

    @property
    def float_type(self) -> str:
        return "fp32" if self.provider == "cpu" or self.layers == "fp32" else "fp16"

    @property
    def quantized(self) -> bool:
        return self.layers in INT_FORMATS or self.lm_head in INT_FORMATS


def llm_form(target: Target, quant: Quant) -> LLMForm:
    """The decoder form for ``target`` with ``--llm quant`` (the target's lm_head when equal)."""
    plan = target.llm
    provider: Provider = "cuda" if target.hardware.sm else "cpu"
    if provider == "cpu" and quant == "fp16":
        raise InputError(
            f"--llm fp16 has no CPU form (onnxruntime has no fp16 CPU kernels; target {target.name})",
            "use --llm fp32 (exact) or --llm int4 / int8 on the cpu target",
        )
    form = LLMForm(provider, quant, quant, plan.block_size or 32, accuracy_level=4 if provider == "cpu" else None)
    head = plan.lm_head if quant == plan.weights else quant
    return dataclasses.replace(form, lm_head=head if head in INT_FORMATS else form.float_type)


@dataclass(frozen=True)
class LLMSource:
    """Where the LLM's tensors are: safetensors files, names under ``prefix``."""

    config: LLMConfig
    files: tuple[Path, ...]
    prefix: str

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> LLMSource:
        return cls(bundle.config.llm, tuple(weight_files(bundle.path)), BUNDLE_PREFIX)

    @classmethod
    def from_model(cls, model: Qwen2ForCausalLM, folder: Path) -> LLMSource:
        """Write ``model``'s tensors to ``folder/llm.safetensors`` (tests and benchmarks)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "llm.safetensors"
        save_file({name: t.detach().contiguous() for name, t in model.state_dict().items()}, str(path))
        return cls(llm_config_of(model), (path,), "")


def llm_config_of(model: Qwen2ForCausalLM) -> LLMConfig:
    """Our ``LLMConfig`` read back from a transformers Qwen2 config."""
    hf = model.config
    names = [f.name for f in dataclasses.fields(LLMConfig) if hasattr(hf, f.name)]
    values = {name: getattr(hf, name) for name in names}
    rope = getattr(hf, "rope_parameters", None) or {}
    values["rope_theta"] = rope.get("rope_theta", getattr(hf, "rope_theta", LLMConfig.rope_theta))
    return LLMConfig(**values)


def export_llm(
    source: LLMSource,
    out_dir: str | Path,
    form: LLMForm,
    context_tokens: int,
    chunk_tokens: int,
    probe: bool = False,
    builder_python: str | None = None,
) -> dict[str, Any]:
    """Write the decoder and the embedding table into ``out_dir``; return the manifest's ``llm``.

    ``probe``: check the written decoder against the PyTorch LLM (:func:`decoder_parity`).
    ``builder_python``: the Python that runs the builder (default: this one).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = BuildSpec(
        config=dataclasses.asdict(source.config),
        files=[str(f) for f in source.files],
        prefix=source.prefix,
        out_dir=str(out),
        provider=form.provider,
        float_type=form.float_type,
        layers=form.layers,
        lm_head=form.lm_head,
        block_size=form.block_size,
        symmetric=form.symmetric,
        accuracy_level=form.accuracy_level,
    )
    builder = run_builder(spec, builder_python)
    table = write_embeddings(source, out / EMBEDDINGS, torch.float32 if form.float_type == "fp32" else torch.float16)
    decoder = onnx.load(str(out / DECODER), load_external_data=False)
    return {
        "decoder": {
            "file": f"{LLM_DIR}/{DECODER}",
            "external_data": f"{LLM_DIR}/{DECODER}.data",
            **graph_interface(decoder),
        },
        "embeddings": {
            "file": f"{LLM_DIR}/{EMBEDDINGS}",
            "tensor": EMBED_TENSOR,
            "shape": list(table.shape),
            "dtype": str(table.dtype).removeprefix("torch."),
        },
        "form": {"provider": form.provider, "float": form.float_type, "kv_cache": kv_dtype(decoder)},
        "quantization": {
            "layers": form.layers,
            "lm_head": form.lm_head,
            "method": "onnxruntime MatMulNBitsQuantizer (RTN), one weight at a time" if form.quantized else None,
            "block_size": form.block_size if form.quantized else None,
            "symmetric": form.symmetric if form.quantized else None,
            "accuracy_level": form.accuracy_level if form.quantized else None,
        },
        "context_tokens": context_tokens,
        "prefill_chunk_tokens": chunk_tokens,
        "builder": {
            "package": builder.split(" ")[0],
            "version": builder.split(" ")[-1],
            "execution_provider": form.provider,
            "precision": form.float_type,
            "extra_options": BUILDER_OPTIONS,
        },
        "matmul_weight_bytes": matmul_weight_bytes(decoder, out),
        "parity": decoder_parity(source, out, form, available_memory()) if probe else None,
        "versions": {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__},
    }


GENAI_DISTRIBUTIONS = ("onnxruntime-genai", "onnxruntime-genai-cuda")
BUILDER_VENV = "python3 -m venv .venv-builder && .venv-builder/bin/pip install -e '.[cpu,export]'"
_PROBE = (
    "import importlib.metadata as m, importlib.util as u, sys\n"
    "found = [f'{d} {m.version(d)}' for d in %r if u.find_spec('onnxruntime_genai') and d in {x.metadata['Name'] for x in m.distributions()}]\n"
    "print(sys.version_info[0], sys.version_info[1], bool(u.find_spec('loc3r.export') and u.find_spec('loc3r.export.llm_build')), found[0] if found else '-')\n"
) % (GENAI_DISTRIBUTIONS,)


@dataclass(frozen=True)
class BuilderFacts:
    """What a Python offers for building the LLM."""

    python: tuple[int, int]
    loc3r: bool
    genai: str | None  # "onnxruntime-genai 0.18.0", or None
    gpu_ort: bool  # onnxruntime-gpu is installed there


def builder_facts(python: str | None = None) -> BuilderFacts:
    """Facts of this Python, or (``python``) of another one, asked in a subprocess."""
    from loc3r.runtime.ort import distribution

    if python is None:
        here = [f"{d} {distribution(d)}" for d in GENAI_DISTRIBUTIONS if distribution(d)]
        genai = here[0] if here and importlib.util.find_spec("onnxruntime_genai") else None
        return BuilderFacts(sys.version_info[:2], True, genai, distribution("onnxruntime-gpu") is not None)
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        raise InputError(f"--builder-python {python} does not run ({exc.strerror or exc})", f"pass a venv's python: {BUILDER_VENV}") from None
    fields = done.stdout.split(maxsplit=3)
    if done.returncode != 0 or len(fields) != 4:
        raise InputError(f"--builder-python {python} does not run ({(done.stderr.strip().splitlines() or ['no output'])[-1]})", f"pass a venv's python: {BUILDER_VENV}")
    genai = None if fields[3].strip() == "-" else fields[3].strip()
    return BuilderFacts((int(fields[0]), int(fields[1])), fields[2] == "True", genai, False)


def builder_problem(facts: BuilderFacts, python: str | None) -> InputError | None:
    """Why the LLM cannot be built with ``facts``' Python, with the route that works; None if it can."""
    where = f"--builder-python {python}" if python else "this Python"
    route = f"build it in a venv of its own: {BUILDER_VENV}, then pass --builder-python .venv-builder/bin/python (or --llm none to leave the LLM out)"
    if facts.python < (3, 11):
        return InputError(
            f"onnxruntime-genai 0.18 (the LLM builder) has no wheel for Python {facts.python[0]}.{facts.python[1]} ({where})",
            f"export on Python >= 3.11 (any machine, no GPU needed) and copy the folder, or {route.replace('python3 -m venv', 'python3.11 -m venv')}",
        )
    if python and not facts.loc3r:
        return InputError(f"{where} has no loc3r installed", f"{python} -m pip install -e '.[cpu,export]'")
    if facts.genai is None:
        if facts.gpu_ort:
            return InputError(
                "onnxruntime-genai is not installed, and beside onnxruntime-gpu it cannot be (it requires the CPU onnxruntime)",
                f"pip install 'loc3r[export-cuda]' (onnxruntime-genai-cuda, on the CUDA 13 onnxruntime-gpu), or {route}",
            )
        if python:
            return InputError(f"{where} has no onnxruntime-genai, and the LLM is built by its model builder", f"{python} -m pip install -e '.[cpu,export]'")
        return InputError("onnxruntime-genai is not installed and the LLM is built by onnxruntime-genai's model builder", "pip install 'loc3r[export]' (or pass --llm none to leave the LLM out)")
    return None


def check_builder(python: str | None = None) -> str:
    """The builder package and version (``onnxruntime-genai 0.18.0``), or the InputError with the route."""
    facts = builder_facts(python)
    problem = builder_problem(facts, python)
    if problem is not None:
        raise problem
    return facts.genai or "?"


def run_builder(spec: BuildSpec, python: str | None = None) -> str:
    """Run :mod:`loc3r.export.llm_build` in a subprocess of this Python or of ``python`` (a venv
    holding loc3r[cpu,export]); its output goes to a log kept on failure. Returns the builder's
    package and version."""
    builder = check_builder(python)
    with tempfile.TemporaryDirectory(prefix="loc3r-llm-build-") as tmp:
        spec_path, log_path = Path(tmp) / "spec.json", Path(tmp) / "builder.log"
        spec.save(spec_path)
        with log_path.open("w", encoding="utf-8") as log:
            done = subprocess.run(
                [python or sys.executable, "-m", "loc3r.export.llm_build", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                check=False,
            )
        if done.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:]
            raise InternalError(
                f"onnxruntime-genai's model builder failed (exit {done.returncode}):\n  " + "\n  ".join(tail),
                "report this with the lines above",
            )
    return builder


def write_embeddings(source: LLMSource, path: Path, dtype: torch.dtype) -> torch.Tensor:
    """The input embedding table in ``dtype``, read from the source files (one tensor)."""
    table = MappedShards(list(source.files)).tensor(source.prefix + EMBED_NAME).to(dtype).contiguous()
    save_file({EMBED_TENSOR: table}, str(path))
    os.chmod(path, 0o666 & ~current_umask())  # safetensors writes 0600
    return table


def graph_interface(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """The graph's inputs and outputs: names, symbolic shapes, dtypes (a manifest fragment)."""

    def entry(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "shape": shape, "dtype": dtype}

    return {"inputs": [entry(v) for v in model.graph.input], "outputs": [entry(v) for v in model.graph.output]}


def kv_dtype(model: onnx.ModelProto) -> str:
    (first,) = [v for v in model.graph.input if v.name == "past_key_values.0.key"]
    return onnx.helper.tensor_dtype_to_np_dtype(first.type.tensor_type.elem_type).name


def matmul_weight_bytes(model: onnx.ModelProto, folder: Path) -> int:
    """Bytes of the initializers that feed MatMul / MatMulNBits: the weight matrices of every
    layer and of lm_head with their scales and zero points; not the norms, biases or rotary
    tables, nor the embedding table."""
    graph = model.graph
    weights = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    weights |= {name for n in graph.node if n.op_type == "MatMulNBits" for name in n.input[1:] if name}
    total = 0
    for init in graph.initializer:
        if init.name in weights:
            external = {e.key: e.value for e in init.external_data}
            total += int(external["length"]) if "length" in external else len(init.raw_data)
    return total


def available_memory() -> int | None:
    """``MemAvailable`` in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decoder_parity(source: LLMSource, folder: Path, form: LLMForm, available: int | None) -> dict[str, Any]:
    """Seeded token embeddings through the decoder (a prefill, then a chunk on top of it) and
    through transformers' Qwen2 in float32 on the source's weights, one layer at a time.

    Skipped, and said so, when loading the decoder would not fit in ``available`` bytes
    (e.g. the 26 GiB fp32 form of a 7B model on a 24 GiB machine).
    """
    from loc3r.runtime.onnx_llm import OnnxLLM

    needed = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(DECODER))
    if available is not None and needed > available:
        return {"skipped": f"loading the decoder needs {needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is available here"}

    total = sum(PARITY_TOKENS)
    llm = OnnxLLM(folder / DECODER, folder / EMBEDDINGS, capacity=total, chunk_tokens=total)
    ids = torch.randint(0, llm.table.shape[0], (total,), generator=torch.Generator().manual_seed(0))
    embeds = torch.from_numpy(llm.embed(ids.tolist()))
    got = [llm.prefill(part) for part in embeds.split(list(PARITY_TOKENS))]
    hidden_got = torch.cat([torch.from_numpy(g.hidden_states) for g in got])
    logits_got = torch.from_numpy(got[-1].last_logits)
    del llm, got
    hidden, logits = reference_outputs(source.config, MappedShards(list(source.files)), source.prefix, embeds)
    return {
        "tokens": list(PARITY_TOKENS),
        "max_abs_hidden": float((hidden_got - hidden).abs().max()),
        "max_abs_logits": float((logits_got - logits).abs().max()),
        "top1_match": bool(logits_got.argmax() == logits.argmax()),
        "tolerance_fp32": FP32_TOLERANCE,
        "exact_form": form.layers == "fp32" and form.lm_head == "fp32",
    }
