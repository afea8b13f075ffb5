"""Published LLaVA-Video checkpoints: layout detection, config reading and tensor names.

Two layouts are read:

- ``llava_next``: the LLaVA-NeXT repository's own (``lmms-lab/LLaVA-Video-7B-Qwen2``):
  ``config.json`` is a Qwen2 config plus ``mm_*`` fields; tensors
  ``model.vision_tower.vision_tower.vision_model.*``, ``model.mm_projector.{0,2}.*``,
  ``model.image_newline``, ``model.{embed_tokens,layers,norm}.*``, ``lm_head.weight``.
  SigLIP sizes are not in the config: widths, depth and patch come from tensor shapes, the
  head count from :data:`SIGLIP_HEADS` (by tower name) or ``vision_heads``, the input size
  (384 for so400m/14, not 27 x 14) from the tower name or a processor config.
  LLaVA-NeXT drops the tower's last layer and reads the output of the one before it, so
  the full depth is the table's (else the stored layers + 1) and ``vision_select_layer=-2``.
- ``hf_onevision``: transformers' ``LlavaOnevisionForConditionalGeneration``
  (``llava-hf/LLaVA-Video-7B-Qwen2-hf``) with transformers-4 names (``vision_tower.*``,
  ``multi_modal_projector.*``, ``image_newline``, ``language_model.{model,lm_head}.*``) or
  transformers-5 names (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
  ``model.image_newline``, ``model.language_model.*``, ``lm_head.*``). Its config has no
  pooling settings.

The video token layout is a recorded choice (``--video-layout``): ``llava-video`` follows
LLaVA-NeXT's code with the checkpoint's ``mm_spatial_pool_*`` / ``mm_newline_position``
(LLaVA-Video's bilinear, stride 2, grid newlines where a -hf config does not say);
``onevision`` follows transformers' LlavaOnevision video path (bilinear, stride 2, one
newline after the video). The default is the layout of the code the checkpoint was
published for: ``llava-video`` for LLaVA-NeXT folders, ``onevision`` for -hf ones.

Weights: ``model.safetensors.index.json``, ``pytorch_model.bin.index.json``, or a single
``model.safetensors`` / ``pytorch_model.bin``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor
from transformers import LlavaOnevisionConfig, Qwen2Config

from loc3r.errors import ModelError
from loc3r.fileio import read_json_object
from loc3r.models.config import ONEVISION_VIDEO, LLMConfig, VideoLayout, VisionConfig
from loc3r.models.convert_input_size import tower_name, vision_input_size
from loc3r.models.convert_stream import DTYPE_NAMES, SourceShards, TensorInfo
from loc3r.models.vision import vision_state_dict_from_hf_llava_onevision, vision_state_dict_from_llava_next

log = logging.getLogger(__name__)

Layout = Literal["llava_next", "hf_onevision"]
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# SigLIP towers by name fragment: (hidden, intermediate, full depth, heads).
SIGLIP_HEADS: dict[str, tuple[int, int, int, int]] = {
    "siglip-so400m-patch14": (1152, 4304, 27, 16),
    "siglip-large-patch16": (1024, 4096, 24, 16),
    "siglip-base-patch16": (768, 3072, 12, 12),
}
LLAVA_VIDEO_POOLING = ("bilinear", 2, "grid")  # mode, stride, newline position
DEFAULT_LAYOUT: dict[str, VideoLayout] = {"llava_next": "llava-video", "hf_onevision": "onevision"}
_FIX = "pass a LLaVA-Video checkpoint folder (lmms-lab/LLaVA-Video-7B-Qwen2 or its -hf version)"
_QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rope_theta", "rope_parameters",
    "rms_norm_eps", "tie_word_embeddings", "hidden_act",
)


@dataclass(frozen=True)
class LlavaSource:
    """An opened LLaVA-Video folder: layout, parsed config.json and its weight shards."""

    path: Path
    layout: Layout
    config: dict[str, Any]
    shards: SourceShards


@dataclass(frozen=True)
class LlavaSettings:
    """The bundle config fields a LLaVA-Video checkpoint determines."""

    vision: VisionConfig
    llm: LLMConfig
    vision_select_layer: int
    default_layout: VideoLayout
    llava_video_pooling: tuple[str, int, str]  # mode, stride, newline position under ``llava-video``
    pooling_defaulted: bool  # the checkpoint does not say; LLaVA-Video's values are used

    def video_pooling(self, layout: VideoLayout) -> tuple[str, int, str]:
        """Pool mode, stride and newline position of ``layout`` for this checkpoint."""
        return ONEVISION_VIDEO if layout == "onevision" else self.llava_video_pooling


def open_llava(folder: Path) -> LlavaSource:
    """Detect the layout of ``folder`` and open its weights (headers only)."""
    config_path = folder / "config.json"
    if not folder.is_dir() or not config_path.is_file():
        raise ModelError(f"{folder} is not a LLaVA checkpoint folder (no config.json)", _FIX)
    config = read_json_object(config_path, _FIX)
    return LlavaSource(folder, detect_layout(config, config_path), config, SourceShards(source_weight_files(folder)))


def detect_layout(config: dict[str, Any], where: Path) -> Layout:
    """``hf_onevision`` for a llava-onevision config, ``llava_next`` for one with ``mm_vision_tower``."""
    architectures = config.get("architectures") or []
    if config.get("model_type") == "llava_onevision" or "LlavaOnevisionForConditionalGeneration" in architectures:
        return "hf_onevision"
    if "mm_vision_tower" in config:
        return "llava_next"
    kind = config.get("model_type") or config.get("architectures") or "unknown"
    raise ModelError(
        f"{where} describes a {kind!s} model, not a LLaVA-Video one (no mm_vision_tower, not llava_onevision)", _FIX
    )


def source_weight_files(folder: Path) -> list[Path]:
    """The shards listed by the weight index, or the single weights file."""
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = list(dict.fromkeys(str(name) for name in weight_map.values()))
            except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelError(f"{index} is not a valid weight index ({exc})", _FIX) from None
            return [folder / name for name in sorted(names)]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ModelError(f"{folder} has no weights ({', '.join(WEIGHT_INDEXES + WEIGHT_FILES)})", _FIX)


def read_settings(source: LlavaSource, vision_heads: int | None = None, image_size: int | None = None) -> LlavaSettings:
    """Sizes, select layer and pooling of ``source`` (pooling: LLaVA-Video's for ``hf_onevision``).

    ``vision_heads`` and ``image_size`` are the user's word for facts a LLaVA-NeXT
    checkpoint may not state (``--vision-heads``, ``--vision-image-size``).
    """
    if source.layout == "hf_onevision":
        return _hf_settings(source, image_size)
    return _next_settings(source, vision_heads, image_size)


def _llm_config(qwen2: Qwen2Config) -> LLMConfig:
    rope = getattr(qwen2, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return LLMConfig(
        vocab_size=qwen2.vocab_size,
        hidden_size=qwen2.hidden_size,
        intermediate_size=qwen2.intermediate_size,
        num_hidden_layers=qwen2.num_hidden_layers,
        num_attention_heads=qwen2.num_attention_heads,
        num_key_value_heads=qwen2.num_key_value_heads,
        max_position_embeddings=qwen2.max_position_embeddings,
        rope_theta=float(rope_theta if rope_theta is not None else getattr(qwen2, "rope_theta", 10000.0)),
        rms_norm_eps=float(qwen2.rms_norm_eps),
        tie_word_embeddings=bool(qwen2.tie_word_embeddings),
        hidden_act=qwen2.hidden_act,
    )


def _hf_settings(source: LlavaSource, image_size: int | None) -> LlavaSettings:
    try:
        hf = LlavaOnevisionConfig.from_dict(source.config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelError(f"{source.path}/config.json is not a valid llava-onevision config ({exc})", _FIX) from None
    strategy = getattr(hf, "vision_feature_select_strategy", "full")
    if strategy != "full":
        raise ModelError(f"vision_feature_select_strategy {strategy!r} is not supported", "LLaVA-Video uses 'full'")
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise ModelError(f"vision_feature_layer {layer!r} (several layers) is not supported", "LLaVA-Video uses one layer")
    vc = hf.vision_config
    vision = VisionConfig(
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads,
        image_size=vision_input_size(source.path, vc.patch_size, None, config_size=vc.image_size, given=image_size),
        patch_size=vc.patch_size,
        layer_norm_eps=float(vc.layer_norm_eps),
        hidden_act=vc.hidden_act,
    )
    return LlavaSettings(vision, _llm_config(hf.text_config), layer, DEFAULT_LAYOUT[source.layout], LLAVA_VIDEO_POOLING,
                         pooling_defaulted=True)


def _next_settings(source: LlavaSource, vision_heads: int | None, image_size: int | None) -> LlavaSettings:
    config = source.config
    qwen2 = Qwen2Config(**{k: config[k] for k in _QWEN2_FIELDS if k in config})
    projector = config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ModelError(f"mm_projector_type {projector!r} is not supported", "LLaVA-Video uses 'mlp2x_gelu'")
    newline = str(config.get("mm_newline_position", "grid"))
    if newline == "one_token" and "unpad" not in str(config.get("mm_patch_merge_type", "flat")):
        newline = "no_token"  # LLaVA-NeXT adds the video's newline only with an *unpad merge type
    pooling = (str(config.get("mm_spatial_pool_mode", "bilinear")), int(config.get("mm_spatial_pool_stride", 2)), newline)
    return LlavaSettings(
        vision=_siglip_from_shapes(source, vision_heads, image_size),
        llm=_llm_config(qwen2),
        vision_select_layer=-2,
        default_layout=DEFAULT_LAYOUT[source.layout],
        llava_video_pooling=pooling,
        pooling_defaulted=False,
    )


_NEXT_TOWER = "model.vision_tower.vision_tower.vision_model."


def _siglip_from_shapes(source: LlavaSource, vision_heads: int | None, image_size: int | None) -> VisionConfig:
    """SigLIP sizes of a LLaVA-NeXT checkpoint from its tensor shapes and tower name; the
    input size from the checkpoint's statements (see :mod:`loc3r.models.convert_input_size`)."""
    infos = source.shards.infos
    tower = tower_name(source.config) or ""

    def shape(suffix: str) -> tuple[int, ...]:
        info = infos.get(_NEXT_TOWER + suffix)
        if info is None:
            raise ModelError(f"{source.path} lacks tensor {_NEXT_TOWER + suffix}", "download all shards of the checkpoint")
        return info.shape

    hidden, _, patch, _ = shape("embeddings.patch_embedding.weight")
    grid = math.isqrt(shape("embeddings.position_embedding.weight")[0])
    intermediate = shape("encoder.layers.0.mlp.fc1.weight")[0]
    layer = re.compile(re.escape(_NEXT_TOWER) + r"encoder\.layers\.(\d+)\.")
    stored = len({m.group(1) for name in infos if (m := layer.match(name))})
    known = next((sizes for fragment, sizes in SIGLIP_HEADS.items() if fragment in tower), None)
    if known is not None and known[:2] != (hidden, intermediate):
        raise ModelError(
            f"vision tower {tower!r} should have widths {known[:2]}, the tensors have {(hidden, intermediate)}",
            "the config and the weights disagree; download the checkpoint again",
        )
    heads = vision_heads or (known[3] if known else None)
    if heads is None:
        raise ModelError(f"vision tower {tower!r} is not a known SigLIP tower (its head count is not in config.json)",
                         "pass --vision-heads N")
    if hidden % heads:
        raise ModelError(f"vision width {hidden} is not divisible by {heads} heads", "pass the right --vision-heads")
    depth = known[2] if known else stored + 1
    vision_config = source.config.get("vision_config")
    stated = vision_config.get("image_size") if isinstance(vision_config, dict) else None
    size = vision_input_size(source.path, patch, grid, tower or None, stated, image_size)
    return VisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=depth,
                        num_attention_heads=heads, image_size=size, patch_size=patch)


def _vision_names(rename: Callable[..., dict[str, Tensor]], names: list[str], keep_layers: int) -> dict[str, str]:
    """Source name -> ``vision.*`` name, by the vision module's mapping (applied to the names)."""
    mapped = rename({name: name for name in names}, keep_layers)  # values pass through untouched
    return {source: "vision." + ours for ours, source in mapped.items()}


_LLM_RULES: dict[Layout, tuple[tuple[str, str], ...]] = {
    "llava_next": (("model.vision_tower.", ""), ("model.mm_projector.", ""), ("model.image_newline", ""),
                   ("model.", "llm.model."), ("lm_head.", "llm.lm_head.")),
    "hf_onevision": (("language_model.model.", "llm.model."), ("language_model.lm_head.", "llm.lm_head."),
                     ("model.language_model.", "llm.model."), ("lm_head.", "llm.lm_head.")),
}


def map_names(source: LlavaSource, keep_layers: int, tie_word_embeddings: bool) -> dict[str, str]:
    """Bundle name -> source tensor name for every tensor the bundle takes (in source order);
    the rest (unused tower layers and parts, ``position_ids``) is left out. With tied
    embeddings and no ``lm_head`` in the source, ``lm_head`` is read from ``embed_tokens``."""
    names = list(source.shards.infos)
    rename = vision_state_dict_from_hf_llava_onevision if source.layout == "hf_onevision" else vision_state_dict_from_llava_next
    vision = _vision_names(rename, names, keep_layers)
    out: dict[str, str] = {}
    for name in names:
        if name in vision:
            out[vision[name]] = name
            continue
        for prefix, target in _LLM_RULES[source.layout]:
            if name.startswith(prefix):
                if target:
                    out[target + name[len(prefix):]] = name
                break
    if tie_word_embeddings and "llm.lm_head.weight" not in out and "llm.model.embed_tokens.weight" in out:
        out["llm.lm_head.weight"] = out["llm.model.embed_tokens.weight"]
    skipped = len(set(names) - set(out.values()))
    if skipped:
        log.info("left out %d source tensors the bundle does not use", skipped)
    return out


def check_against(
    mapping: dict[str, str], infos: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], where: Path
) -> None:
    """Every expected tensor is mapped with the expected shape and a floating-point dtype,
    and nothing else is."""
    problems = []
    unexpected = sorted(set(mapping) - set(expected))
    if unexpected:
        problems.append(f"tensors the config does not describe: {_names([mapping[n] for n in unexpected])}")
    misshaped = [f"{mapping[n]} {infos[mapping[n]].shape} (config: {expected[n]})"
                 for n in mapping if n in expected and infos[mapping[n]].shape != expected[n]]
    if misshaped:
        problems.append(f"shapes that disagree with config.json: {_names(misshaped)}")
    mistyped = [f"{mapping[n]} ({DTYPE_NAMES.get(infos[mapping[n]].dtype, infos[mapping[n]].dtype)})"
                for n in mapping if n in expected and not infos[mapping[n]].dtype.is_floating_point]
    if mistyped:
        problems.append(f"weights stored as integers or booleans, not floating point: {_names(mistyped)}")
    missing = sorted(set(expected) - set(mapping))
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if problems:
        raise ModelError(f"{where}: {'; '.join(problems)}", "download the complete checkpoint again")


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
