"""Video token layouts, an explicit choice recorded in the bundle, with parity for each.

``onevision`` is transformers' LlavaOnevision video path (per frame the pooled tokens, then
one ``image_newline`` after the whole video): checked against ``get_video_features`` and,
through a whole session, against transformers' language model on the same sequence.
``llava-video`` follows LLaVA-NeXT's ``mm_newline_position`` (``grid``, ``frame``,
``one_token``, ``no_token``): checked against transformers' pooled features laid out as
LLaVA-NeXT's ``add_token_per_grid`` / ``add_token_per_frame`` do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from llava_checkpoints import hf_folder, write_cut3r_file
from loc3r.errors import ModelError
from loc3r.export import cli as export_cli
from loc3r.models.bundle import load_bundle
from loc3r.models.prompt import build_question_suffix
from loc3r.models.vision import VisionPath
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.preprocess import siglip_input
from loc3r.runtime.session import Stages
from loc3r.runtime.torch_backend import torch_stages
from loc3r.runtime.video import Frame

TOL = 1e-5
FRAMES = 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One -hf checkpoint converted with each layout, and the transformers model it holds."""
    root = tmp_path_factory.mktemp("layouts")
    folder, hf = hf_folder(root, "t5", "safetensors")
    cut3r, _ = write_cut3r_file(root)
    from loc3r.models.convert_cli import main

    bundles = {}
    for layout, flags in (("onevision", []), ("llava-video", ["--video-layout", "llava-video"])):
        out = root / layout
        assert main(["--llava", str(folder), "--cut3r", str(cut3r), "--out", str(out), *flags]) == 0
        bundles[layout] = out
    return {"hf": hf.eval(), "bundles": bundles}


def pixels(frames: int = FRAMES) -> torch.Tensor:
    return torch.rand(1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1


def pooled_reference(hf, video: torch.Tensor) -> torch.Tensor:
    """transformers' per-frame pooled features ``(frames, tokens, D)`` (its video newline left out)."""
    with torch.no_grad():
        features = hf.model.get_video_features(pixel_values_videos=video).pooler_output[0]
    return features[:-1].reshape(video.shape[1], -1, features.shape[-1])


def llava_next_layout(pooled: torch.Tensor, newline: torch.Tensor, position: str) -> torch.Tensor:
    """LLaVA-NeXT's video token sequence for ``mm_newline_position`` (llava_arch.py's ops)."""
    frames, tokens, dim = pooled.shape
    side = int(tokens**0.5)
    if position == "grid":  # add_token_per_grid: rows of all frames, each closed by the newline
        x = pooled.view(frames, 1, side, side, dim).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        x = torch.cat((x, newline[:, None, None].expand(*x.shape[:-1], 1)), dim=-1)
        return x.flatten(1, 2).transpose(0, 1)
    if position == "frame":  # add_token_per_frame
        x = pooled.permute(2, 0, 1)
        x = torch.cat((x, newline[:, None, None].expand(*x.shape[:-1], 1)), dim=-1)
        return x.permute(1, 2, 0).flatten(0, 1)
    flat = pooled.flatten(0, 1)
    return torch.cat((flat, newline[None])) if position == "one_token" else flat


def our_sequence(vision: VisionPath, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat((vision.encode(video[0]).flatten(0, 1), vision.video_end()))


def test_converted_bundles_record_their_layout(converted) -> None:
    onevision = load_bundle(converted["bundles"]["onevision"]).config
    llava_video = load_bundle(converted["bundles"]["llava-video"]).config
    assert (onevision.video_layout, onevision.spatial_pool_mode, onevision.newline_position) == ("onevision", "bilinear", "one_token")
    assert (llava_video.video_layout, llava_video.newline_position) == ("llava-video", "grid")


def test_onevision_matches_transformers_video_features(converted) -> None:
    hf, vision = converted["hf"], load_bundle(converted["bundles"]["onevision"]).model.vision
    video = pixels()
    with torch.no_grad():
        reference = hf.model.get_video_features(pixel_values_videos=video).pooler_output[0]
    ours = our_sequence(vision, video)
    assert ours.shape == reference.shape == (FRAMES * 4 + 1, 32)
    assert (ours - reference).abs().max().item() < TOL


@pytest.mark.parametrize("position", ["grid", "frame", "one_token", "no_token"])
def test_llava_next_layouts_match_the_reference_ops(converted, position: str) -> None:
    hf, bundle = converted["hf"], load_bundle(converted["bundles"]["llava-video"])
    config = dataclasses.replace(bundle.config, newline_position=position)
    vision = VisionPath(config).eval()
    vision.load_state_dict(bundle.model.vision.state_dict())
    video = pixels()
    reference = llava_next_layout(pooled_reference(hf, video), hf.model.image_newline.detach(), position)
    ours = our_sequence(vision, video)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() < TOL


def frames(count: int) -> list[Frame]:
    rng = np.random.default_rng(2)
    return [Frame(i, float(i), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for i in range(count)]


def test_onevision_session_matches_transformers_language_model(converted) -> None:
    """The session's cached sequence is transformers' video layout with a camera token per frame."""
    hf, bundle = converted["hf"], load_bundle(converted["bundles"]["onevision"])
    pipeline = Pipeline(bundle, Stages(*torch_stages(bundle)), "torch")
    session = pipeline.new_session("frames")
    decoded = frames(FRAMES)
    for frame in decoded:
        session.add_frame(frame)
    session.finish(float(FRAMES))
    prefix = session._prefix()
    assert prefix.end_tokens == 1 and session.stages.llm.cached_length == prefix.length
    suffix = build_question_suffix(bundle.tokenizer, "where is the chair?")
    ours = session.stages.llm.prefill(session.stages.llm.embed(suffix.ids)).last_logits

    video = siglip_input([f.rgb for f in decoded], 56)[None]
    with torch.no_grad():
        features = hf.model.get_video_features(pixel_values_videos=video).pooler_output[0]
        per_frame = features[:-1].reshape(FRAMES, 4, -1)
        cameras = [block[:1] for block in session.encoded.blocks]
        embed = hf.get_input_embeddings()
        sequence = torch.cat([
            embed(torch.tensor(prefix.head_ids)),
            *[torch.cat((camera, tokens)) for camera, tokens in zip(cameras, per_frame, strict=True)],
            features[-1:],  # the video's one newline
            embed(torch.tensor(prefix.tail_ids)),
            embed(torch.tensor(suffix.ids)),
        ])
        hidden = hf.model.language_model(inputs_embeds=sequence[None]).last_hidden_state
        reference = hf.lm_head(hidden[0, -1])
    assert (ours - reference).abs().max().item() < 1e-4


def test_onevision_live_session_reuses_its_prefix(converted) -> None:
    """Frames after a question: the video's newline moves to the new end (cut back with the tail)."""
    bundle = load_bundle(converted["bundles"]["onevision"])
    pipeline = Pipeline(bundle, Stages(*torch_stages(bundle)), "torch")
    sampling = SamplingConfig(max_new_tokens=4)
    live = pipeline.new_session("live")
    decoded = frames(FRAMES + 1)
    for frame in decoded[:FRAMES]:
        live.add_frame(frame)
    live.ask("how far is the door?", sampling=sampling)
    live.add_frame(decoded[FRAMES])
    again = live.ask("where is the chair?", sampling=sampling)
    fresh = pipeline.new_session("fresh")
    for frame in decoded:
        fresh.add_frame(frame)
    expected = fresh.ask("where is the chair?", sampling=sampling)
    assert again.token_ids == expected.token_ids
    assert again.pose.x == pytest.approx(expected.pose.x, abs=1e-5)


def test_onevision_export_and_onnxruntime_backend(converted, tmp_path: Path) -> None:
    bundle_dir = converted["bundles"]["onevision"]
    out = tmp_path / "export"
    assert export_cli.main(["--model", str(bundle_dir), "--target", "cpu", "--out", str(out), "--llm", "none"]) == 0
    video = write_demo_video(tmp_path / "v.mp4", num_frames=8, width=128, height=96)
    sampling = SamplingConfig(max_new_tokens=6)
    ref = Pipeline.from_pretrained(bundle_dir).ask(video, "Where am I?", num_frames=FRAMES, sampling=sampling)
    ort = Pipeline.from_pretrained(bundle_dir, backend="onnxruntime", engines=out).ask(
        video, "Where am I?", num_frames=FRAMES, sampling=sampling)
    assert ort.token_ids == ref.token_ids
    assert ort.pose.x == pytest.approx(ref.pose.x, abs=1e-4)
    (out / "video_end.safetensors").unlink()
    with pytest.raises(ModelError, match="lacks video_end.safetensors, which its manifest lists"):
        Pipeline.from_pretrained(bundle_dir, backend="onnxruntime", engines=out)
