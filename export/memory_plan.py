"""Device memory an export needs on a target, item by item, and whether it fits.

Items (bytes):

- weights of every artifact, as stored on disk and as the target loads them: ONNX graphs
  are stored in fp32 and loaded at the target's build precision (fp16 TensorRT engines on
  GPU targets: half); the LLM decoder and its embedding table are loaded as stored;
- the KV cache at the context limit, one preallocated buffer per layer:
  ``layers x 2 x kv_heads x head_dim x context x bytes``;
- activations of one LLM prefill chunk (estimate): the residual stream, q/k/v and MLP
  intermediates of one layer at a time, the attention probabilities of the CPU kernel
  (``heads x chunk x context`` fp32; the GPU kernel is flash attention, none), the hidden
  states and last-position logits returned;
- activations of one vision batch, one CUT3R encoder batch and one CUT3R step at square
  frames (or one VGGT clip, attention fused) (estimate, the largest layer of the
  transformer: tokens x (4 x width + 2 x MLP width) plus unfused attention scores);
- runtime overhead (assumption): CUDA context and libraries on GPU targets, the Python
  process with torch and onnxruntime on the CPU.

The budget is the target's ``memory_gb - reserved_gb`` (GiB; on a Jetson CPU and GPU share
it). Before exporting, :func:`predicted_weights` sizes every artifact from the config, so a
target that cannot fit is refused at once; after exporting, :func:`measured_weights` reads
the files written and the manifest records that plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from loc3r.engines.targets import Target, list_targets, load_target
from loc3r.errors import InputError
from loc3r.export.llm import LLMForm
from loc3r.models.config import LLMConfig, Loc3rConfig
from loc3r.models.cut3r import Cut3rConfig

GIB = 2**30
#: An assumption, not a measurement (no GPU here): one process's CUDA context plus the libraries
#: the runtime loads on the GPU (cuBLAS/cuDNN through ONNX Runtime's CUDA provider, TensorRT's
#: runtime). ``loc3r-doctor`` measures the real figure on a device (the memory a second process
#: takes for a CUDA context and ONNX Runtime's CUDA provider running a MatMul); compare it
#: there before trusting a plan that fits by less than the difference.
GPU_OVERHEAD = 1 * GIB
CPU_OVERHEAD = GIB // 2  # assumption: Python + torch + onnxruntime (~0.4 GiB measured here) and slack
FLOAT_BYTES = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class Weights:
    """One artifact's weights: bytes on disk and bytes once the target has loaded them."""

    disk: int
    loaded: int


@dataclass(frozen=True)
class PlanItem:
    name: str
    bytes: int
    basis: str


@dataclass(frozen=True)
class MemoryPlan:
    """The items a target must hold at once, against its budget."""

    target: str
    budget: int
    context_tokens: int
    chunk_tokens: int
    items: tuple[PlanItem, ...]
    kv_bytes_per_token: int
    source: str  # "predicted from config.json" or "measured from the written files"

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": self.source,
            "budget_bytes": self.budget,
            "total_bytes": self.total,
            "fits": self.fits,
            "headroom_bytes": self.budget - self.total,
            "context_tokens": self.context_tokens,
            "prefill_chunk_tokens": self.chunk_tokens,
            "items": [{"name": i.name, "bytes": i.bytes, "basis": i.basis} for i in self.items],
        }



def budget_bytes(target: Target) -> int:
    return int((target.hardware.memory_gb - target.hardware.reserved_gb) * GIB)


def kv_bytes_per_token(llm: LLMConfig, kv_float: str) -> int:
    return llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * FLOAT_BYTES[kv_float]


def memory_plan(
    config: Loc3rConfig,
    target: Target,
    weights: dict[str, Weights],
    form: LLMForm | None,
    context_tokens: int,
    camera_size: tuple[int, int],
    source: str,
) -> MemoryPlan:
    """The plan for ``weights`` (see :func:`predicted_weights` / :func:`measured_weights`);
    ``form`` None: no LLM exported, the runtime runs the bundle's PyTorch LLM in fp32;
    ``camera_size``: the largest (height, width) the 3D encoder is fed."""
    float_type = form.float_type if form else "fp32"
    items = [_weights_item(name, w) for name, w in weights.items()]
    if form is None:
        items.append(PlanItem("weights: llm (PyTorch, from the bundle)", _parameter_bytes(config.llm), "fp32 parameters"))
    per_token = kv_bytes_per_token(config.llm, float_type)
    items += [
        PlanItem(
            f"KV cache ({float_type}, {context_tokens} tokens)",
            per_token * context_tokens,
            "layers x 2 x kv_heads x head_dim x context x bytes, allocated at start",
        ),
        _prefill_item(config.llm, target, context_tokens, FLOAT_BYTES[float_type]),
        *_encoder_items(config, target, camera_size),
        _overhead_item(target),
    ]
    return MemoryPlan(target.name, budget_bytes(target), context_tokens, target.llm.prefill_chunk, tuple(items), per_token, source)


def _weights_item(name: str, weights: Weights) -> PlanItem:
    loaded = "as stored" if weights.loaded == weights.disk else "in fp16"
    return PlanItem(f"weights: {name}", weights.loaded, f"{weights.disk} bytes on disk, loaded {loaded}")


def _prefill_item(llm: LLMConfig, target: Target, context: int, io: int) -> PlanItem:
    chunk = target.llm.prefill_chunk
    qkv = (llm.num_attention_heads + 2 * llm.num_key_value_heads) * llm.head_dim
    layer = chunk * (4 * llm.hidden_size + qkv + 3 * llm.intermediate_size) * io
    attention = 0 if target.hardware.sm else llm.num_attention_heads * chunk * context * 4
    outputs = chunk * llm.hidden_size * 4 + llm.vocab_size * 4
    return PlanItem(
        f"LLM prefill chunk ({chunk} tokens)",
        layer + attention + outputs,
        "estimate: one layer's intermediates, CPU attention probabilities, outputs",
    )


def _encoder_items(config: Loc3rConfig, target: Target, camera_size: tuple[int, int]) -> list[PlanItem]:
    """The largest layer of each encoder pass: a SigLIP batch, and CUT3R's ViT batch and step
    (or a VGGT clip at the profile's optimal frame count, attention fused as TensorRT does)."""
    act = 2 if target.build.precision == "fp16" else 4
    vision = config.vision
    frames = target.build.vision_frames[2]
    siglip = _layer_bytes(vision.grid**2, vision.hidden_size, vision.intermediate_size, vision.num_attention_heads, act)
    items = [PlanItem(f"vision batch ({frames} frames)", frames * siglip, "estimate: the largest layer")]
    if config.encoder_3d == "vggt":
        from loc3r.export.tensorrt_build import CLIP_FRAMES
        from loc3r.models.vggt import VggtConfig

        vggt = VggtConfig.from_dict(config.vggt)
        clip = CLIP_FRAMES[1]
        tokens = clip * ((camera_size[0] // vggt.patch_size) * (camera_size[1] // vggt.patch_size) + 1 + vggt.num_register_tokens)
        layer = tokens * (4 * vggt.embed_dim + 2 * int(vggt.embed_dim * vggt.mlp_ratio)) * act
        return [*items, PlanItem(f"VGGT clip ({clip} frames)", layer, "estimate: the largest layer, attention fused (not materialised)")]
    cut3r = Cut3rConfig.from_dict(config.cut3r)
    patches = (camera_size[0] // cut3r.patch_size) * (camera_size[1] // cut3r.patch_size)
    encoder = frames * _layer_bytes(patches, cut3r.enc_embed_dim, int(cut3r.enc_embed_dim * cut3r.mlp_ratio), cut3r.enc_num_heads, act)
    width = cut3r.dec_embed_dim
    step = _layer_bytes(patches + cut3r.state_size, width, int(width * cut3r.mlp_ratio), cut3r.dec_num_heads, act)
    return [
        *items,
        PlanItem(f"CUT3R encoder batch ({frames} frames)", encoder, "estimate: the largest layer"),
        PlanItem("CUT3R step", step, "estimate: the largest layer"),
    ]


def _overhead_item(target: Target) -> PlanItem:
    if target.hardware.sm:
        return PlanItem("runtime overhead", GPU_OVERHEAD, "assumption: CUDA context and libraries (loc3r-doctor measures it on the device)")
    return PlanItem("runtime overhead", CPU_OVERHEAD, "assumption: Python, torch, onnxruntime")


def _layer_bytes(tokens: int, width: int, mlp: int, heads: int, bytes_per: int) -> int:
    return tokens * (4 * width + 2 * mlp) * bytes_per + heads * tokens * tokens * bytes_per


def _parameter_bytes(llm: LLMConfig) -> int:
    layer = 2 * llm.hidden_size * (llm.num_attention_heads + llm.num_key_value_heads) * llm.head_dim
    layer += 3 * llm.hidden_size * llm.intermediate_size
    return 4 * (llm.num_hidden_layers * layer + 2 * llm.vocab_size * llm.hidden_size)


# -- weights ------------------------------------------------------------------------------


def onnx_file_bytes(path: Path) -> int:
    """A graph's file plus the external data files it names."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def measured_weights(root: Path, artifacts: dict[str, Any], llm: dict[str, Any] | None, target: Target) -> dict[str, Weights]:
    """Weights of the written files under ``root``."""
    half = target.build.precision == "fp16"
    weights = {}
    for name, entry in artifacts.items():
        disk = onnx_file_bytes(root / entry["file"])
        if "initial_state" in entry:
            disk += (root / entry["initial_state"]).stat().st_size
        weights[name] = Weights(disk, disk // 2 if half else disk)
    if llm:
        decoder = onnx_file_bytes(root / llm["decoder"]["file"])
        table = (root / llm["embeddings"]["file"]).stat().st_size
        weights["llm decoder"] = Weights(decoder, decoder)
        weights["llm embedding table"] = Weights(table, table)
    return weights


def predicted_weights(config: Loc3rConfig, target: Target, form: LLMForm | None) -> dict[str, Weights]:
    """Weights predicted from the config: parameter counts x bytes, int4/int8 block packing."""
    from loc3r.models.loc3r_model import Loc3rModel

    with torch.device("meta"):
        model = Loc3rModel(config)
    heads, camera = model.heads, model.camera_encoder
    if config.encoder_3d == "vggt":
        counts = {"vggt_encode": _count(camera) + _count(heads.f_cam)}
    else:  # the ViT in cut3r_encoder; the rest but the state's register tokens (cut3r_init) in cut3r_step
        encoder = _count(camera.patch_embed) + _count(camera.enc_blocks) + _count(camera.enc_norm)
        counts = {"cut3r_encoder": encoder, "cut3r_step": _count(camera) - encoder - _count(camera.register_tokens) + _count(heads.f_cam)}
    counts.update(
        vision=_count(model.vision),
        pose_head=_count(heads.f_pos) + _count(heads.f_ori),
        bev_head=_count(heads.f_bev),
    )
    half = target.build.precision == "fp16"
    weights = {name: Weights(4 * n, 2 * n if half else 4 * n) for name, n in counts.items()}
    if form is not None:
        decoder = predicted_decoder_bytes(config.llm, form)
        table = config.llm.vocab_size * config.llm.hidden_size * FLOAT_BYTES[form.float_type]
        weights["llm decoder"] = Weights(decoder, decoder)
        weights["llm embedding table"] = Weights(table, table)
    return weights


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def predicted_decoder_bytes(llm: LLMConfig, form: LLMForm) -> int:
    """``decoder.onnx`` initializers: the MatMul weights in their formats, biases, norms,
    rotary tables (the graph's own constants are a few hundred bytes)."""
    io = FLOAT_BYTES[form.float_type]
    width, inter, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
    qkv = (llm.num_attention_heads + 2 * llm.num_key_value_heads) * hd
    layer_matmuls = [(width, qkv), (llm.num_attention_heads * hd, width), (width, inter), (width, inter), (inter, width)]
    per_layer = sum(_matmul_bytes(k, n, form.layers, form, io) for k, n in layer_matmuls)
    per_layer += qkv * io + 2 * width * io  # q/k/v bias, two RMSNorm weights
    head = _matmul_bytes(width, llm.vocab_size, form.lm_head, form, io)
    rotary = 2 * llm.max_position_embeddings * (hd // 2) * io
    return llm.num_hidden_layers * per_layer + head + width * io + rotary


def _matmul_bytes(k: int, n: int, kind: str, form: LLMForm, io: int) -> int:
    if kind not in ("int8", "int4"):
        return k * n * io
    bits = 8 if kind == "int8" else 4
    blocks = math.ceil(k / form.block_size)
    packed = n * blocks * form.block_size * bits // 8
    zero_points = 0 if form.symmetric else n * math.ceil(blocks * bits / 8)
    return packed + n * blocks * io + zero_points


# -- refusal ------------------------------------------------------------------------------


def check_fits(plan: MemoryPlan, config: Loc3rConfig, tokens_per_frame: int, quant: str | None) -> None:
    """Refuse a plan over budget, naming the numbers and the ways out."""
    if plan.fits:
        return
    over = plan.total - plan.budget
    ways = []
    kv = plan.kv_bytes_per_token
    if kv:
        fewer = plan.context_tokens - math.ceil(over / kv)
        if fewer >= tokens_per_frame:
            ways.append(f"--context-tokens {fewer} (about {fewer // tokens_per_frame} frames of {tokens_per_frame} tokens)")
    if quant not in (None, "int4"):
        ways.append("--llm int4")
    bigger = [name for name in list_targets() if budget_bytes(load_target(name)) >= plan.total]
    ways.append(f"a module with more memory ({', '.join(bigger)})" if bigger else "a device with more memory")
    raise InputError(
        f"{config.model_id} does not fit target {plan.target}: it needs {plan.total / GIB:.2f} GiB "
        f"({', '.join(f'{i.name} {i.bytes / GIB:.2f}' for i in sorted(plan.items, key=lambda i: -i.bytes)[:3])}) "
        f"but {plan.budget / GIB:.2f} GiB is available",
        "try " + ", or ".join(ways),
    )
