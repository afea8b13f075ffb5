"""LLaVA-Video + a 3D encoder (CUT3R or VGGT) (+ Loc3R heads) -> our bundle, streamed tensor by tensor.

Order of work: read every config and header, build the bundle config, check each tensor's
name and shape against a ``Loc3rModel`` built on the meta device (no memory), then write
``config.json``, ``tokenizer.json`` and the weight shards in one atomic folder. The 3D
encoder's camera path is loaded by :func:`load_cut3r` (memory-mapped) or
:func:`load_vggt`; LLaVA tensors are read one source shard at a time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from loc3r.errors import InputError, ModelError
from loc3r.fileio import atomic_directory, check_replaceable
from loc3r.models.bundle import BUNDLE_KIND
from loc3r.models.weights import expected_shapes
from loc3r.models.config import HeadsConfig, Loc3rConfig, VideoLayout
from loc3r.models.convert_heads import heads_config, load_heads_file, random_heads
from loc3r.models.convert_llava import LlavaSettings, check_against, map_names, open_llava, read_settings
from loc3r.models.convert_stream import SourceShards, TensorInfo, write_shards
from loc3r.models.convert_tokenizer import loc3r_tokenizer
from loc3r.models.cut3r import load_cut3r
from loc3r.models.vggt import load_vggt
from loc3r.models.vision import used_vision_layers

if TYPE_CHECKING:
    from loc3r.models.encoder3d import CameraEncoder

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2_000_000_000


@dataclass(frozen=True)
class ConvertOptions:
    """What ``loc3r-convert`` was asked to do."""

    llava: Path
    cut3r: Path | None  # the 3D encoder: exactly one of cut3r and vggt
    out: Path
    heads: Path | None = None
    model_id: str | None = None
    dtype: torch.dtype | None = None  # None keeps each tensor's dtype
    pool_mode: str | None = None  # overrides the checkpoint's (or LLaVA-Video's default)
    vision_heads: int | None = None  # SigLIP head count for towers not in the table
    vision_image_size: int | None = None  # input side for checkpoints that do not state it
    video_layout: VideoLayout | None = None  # None: the checkpoint's (see convert_llava)
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    vggt: Path | None = None


def _check_part(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], prefix: str, where: Path) -> None:
    wanted = {n: s for n, s in expected.items() if n.startswith(prefix)}
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    bad = sorted(set(wanted) ^ set(shapes)) + sorted(n for n in set(wanted) & set(shapes) if wanted[n] != shapes[n])
    if bad:
        detail = ", ".join(f"{n} {shapes.get(n, 'missing')} (expected {wanted.get(n, 'none')})" for n in bad[:3])
        raise ModelError(f"{where} does not fit the bundle: {detail}", "pass a file made for this model")


def load_camera_encoder(options: ConvertOptions) -> tuple[CameraEncoder, dict[str, Any]]:
    """The 3D encoder named by the options and the config fields that record it."""
    if (options.cut3r is None) == (options.vggt is None):
        raise InputError("give exactly one 3D encoder", "pass --cut3r FILE or --vggt FILE")
    if options.vggt is not None:
        vggt = load_vggt(options.vggt)
        return vggt, {"encoder_3d": "vggt", "vggt": vggt.config.to_dict()}
    cut3r = load_cut3r(options.cut3r)
    return cut3r, {"encoder_3d": "cut3r", "cut3r": cut3r.config.to_dict(), "cut3r_long_side": max(cut3r.config.img_size)}


def bundle_config(options: ConvertOptions, settings: LlavaSettings, encoder: dict[str, Any], heads: HeadsConfig | None) -> Loc3rConfig:
    """The bundle's config; ``encoder`` holds the 3D encoder's fields (``load_camera_encoder``);
    ``heads`` None means random heads (``localization: untrained``)."""
    layout = options.video_layout or settings.default_layout
    pool_mode, pool_stride, newline = settings.video_pooling(layout)
    if options.pool_mode and layout == "onevision" and options.pool_mode != pool_mode:
        raise InputError(f"--pool-mode {options.pool_mode} does not apply to the onevision layout, which pools {pool_mode}",
                         "leave out --pool-mode, or pass --video-layout llava-video")
    config = Loc3rConfig(
        model_id=options.model_id or options.llava.resolve().name,
        vision=settings.vision,
        llm=settings.llm,
        **encoder,
        heads=heads or HeadsConfig(),
        vision_select_layer=settings.vision_select_layer,
        spatial_pool_mode=options.pool_mode or pool_mode,  # type: ignore[arg-type]
        spatial_pool_stride=pool_stride,
        newline_position=newline,  # type: ignore[arg-type]
        video_layout=layout,
        localization="trained" if heads else "untrained",
        random_weights=False,
    )
    return Loc3rConfig.from_dict(config.to_dict())  # the round trip validates every field


def convert(options: ConvertOptions) -> Path:
    """Write the bundle at ``options.out`` (atomically) and return its path."""
    check_replaceable(options.out, BUNDLE_KIND)  # before any work
    source = open_llava(options.llava)
    settings = read_settings(source, options.vision_heads, options.vision_image_size)
    camera, encoder_fields = load_camera_encoder(options)
    head_file = load_heads_file(options.heads) if options.heads else None
    config = bundle_config(options, settings, encoder_fields, heads_config(head_file) if head_file else None)
    if settings.pooling_defaulted and config.video_layout == "llava-video":
        log.warning("the llava-onevision config has no pooling settings; recorded LLaVA-Video's: %s, stride %d, "
                    "%s newlines (--pool-mode sets the mode)", config.spatial_pool_mode, config.spatial_pool_stride,
                    config.newline_position)
    expected = expected_shapes(config)
    mapping = map_names(source, used_vision_layers(config.vision, config.vision_select_layer), config.llm.tie_word_embeddings)
    llava_part = {n: shape for n, shape in expected.items() if n.startswith(("vision.", "llm."))}
    check_against(mapping, source.shards.infos, llava_part, source.path)
    extra = {"camera_encoder." + n: t for n, t in camera.state_dict().items()}
    _check_part(extra, expected, "camera_encoder.", options.cut3r or options.vggt)
    heads = {"heads." + n: t for n, t in (head_file or random_heads(config, camera.camera_dim)).items()}
    _check_part(heads, expected, "heads.", options.heads or Path("random heads"))
    extra.update(heads)
    del camera, head_file, heads  # the tensors live on in ``extra`` only, released one by one once written
    tokenizer = loc3r_tokenizer(source.path, config.llm.vocab_size)
    with atomic_directory(options.out, BUNDLE_KIND) as staging:
        (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        tokenizer.save(staging)
        infos, tensors = _stream(extra, source.shards, mapping, options.dtype)
        files = write_shards(staging, infos, tensors, options.max_shard_bytes)
    log.info("wrote %s: %d tensors in %d files", options.out, len(infos), len(files))
    return options.out


def _stream(
    extra: dict[str, Tensor], shards: SourceShards, mapping: dict[str, str], dtype: torch.dtype | None
) -> tuple[dict[str, TensorInfo], Iterator[tuple[str, Tensor]]]:
    """The output plan (name -> dtype, shape, in write order) and the tensors in that order:
    ``extra`` first (emptied as it goes), then the LLaVA tensors source shard by shard."""
    by_source: dict[str, list[str]] = {}  # a source tensor may feed two (tied embeddings)
    for name, src in mapping.items():
        by_source.setdefault(src, []).append(name)

    def cast(original: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and original.is_floating_point else original

    infos = {n: TensorInfo(cast(t.dtype), tuple(t.shape)) for n, t in extra.items()}
    for src, names in by_source.items():
        info = shards.infos[src]
        infos.update({n: TensorInfo(cast(info.dtype), info.shape) for n in names})

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for name in list(extra):
            yield name, extra.pop(name).to(infos[name].dtype)
        for src, tensor in shards.read(by_source):
            for name in by_source[src]:
                yield name, tensor.to(infos[name].dtype)

    return infos, tensors()
