"""The plain PyTorch reference, run in the same process as the optimized paths.

What it runs, in this order, fp32 eager, nothing cached or overlapped:

1. decode every sampled frame into memory (the whole video held as RGB arrays);
2. CUT3R over all frames, one step per frame, with ``f_cam``, PLUS a stand-in for the
   heads the reference ``ARCroco3DStereo`` runs on every frame (DPT points/depth/pose). We
   do not implement DPT: :class:`StandInHead` is a two-layer MLP on the decoder's image
   tokens (``dec_dim -> hidden -> patch^2 x 4``, the 224 linear head's output layout) whose
   width is chosen so that its FLOPs equal the heads' share of a full frame
   (``Cut3rSizes.head_flop_share`` = 37% at 512x384, the figure the floor model uses), at
   this model's widths and this input size. Its input is a fixed tensor of the decoder
   output's shape: the cost, not the values, is what is modelled;
3. SigLIP + projector + pooling on all frames in one batch;
4. one prefill of the whole prompt (head, video, time text, question) on an empty KV
   cache, then the first token. A follow-up question prefills the whole prompt again
   (no prefix KV cache); the encoded frames are kept in memory between the two
   questions, which favours the baseline (the reference re-encodes the video per call).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from loc3r.bench.flops import Cut3rSizes, cut3r_frame
from loc3r.bench.measure import elapsed, time_decode, time_heads
from loc3r.models.bundle import Bundle
from loc3r.models.cut3r import Cut3rConfig
from loc3r.models.llm import PrefillResult, TorchLLM
from loc3r.models.prompt import build_question_suffix, build_video_prefix
from loc3r.models.vision import video_end_tokens, vision_tokens_per_frame
from loc3r.runtime.preprocess import cut3r_input, siglip_input
from loc3r.runtime.torch_backend import TorchHeads
from loc3r.runtime.video import iter_frames

HEAD_CHANNELS = 4  # 3D point + confidence per pixel, as the linear head outputs


class StandInHead(nn.Module):
    """``Linear(dec_dim, hidden) -> GELU -> Linear(hidden, patch^2 x 4)`` per image token."""

    def __init__(self, dec_dim: int, hidden: int, patch_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dec_dim, hidden), nn.GELU(), nn.Linear(hidden, patch_size**2 * HEAD_CHANNELS))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.mlp(tokens)


def head_flops(config: Cut3rConfig, height: int, width: int) -> float:
    """FLOPs per frame of the reference's heads at this config and input size."""
    sizes = Cut3rSizes(config=config, height=height, width=width)
    body = cut3r_frame(sizes).flops
    return body * sizes.head_flop_share / (1.0 - sizes.head_flop_share)


def stand_in_hidden(config: Cut3rConfig, height: int, width: int) -> int:
    """MLP width that makes :class:`StandInHead` cost :func:`head_flops` on one frame."""
    tokens = (height // config.patch_size) * (width // config.patch_size)
    per_hidden = 2.0 * tokens * (config.dec_embed_dim + config.patch_size**2 * HEAD_CHANNELS)
    return max(1, round(head_flops(config, height, width) / per_hidden))


@dataclass
class BaselineRun:
    """One repeat's stage seconds and what it held in memory."""

    seconds: dict[str, float]
    frames_in_memory_mib: float


class Baseline:
    """The reference order over a bundle's PyTorch modules (see the module docstring)."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.config = bundle.config
        self.cut3r = Cut3rConfig.from_dict(self.config.cut3r)
        self._heads: dict[tuple[int, int], tuple[StandInHead, Tensor]] = {}

    def describe(self, height: int, width: int) -> dict[str, object]:
        """What the stand-in head is at this input size."""
        p = self.cut3r.patch_size
        return {
            "stand_in_head": f"Linear({self.cut3r.dec_embed_dim}, {stand_in_hidden(self.cut3r, height, width)}) -> GELU -> "
            f"Linear(., {p**2 * HEAD_CHANNELS}) on {(height // p) * (width // p)} image tokens per frame",
            "stand_in_head_gflops_per_frame": head_flops(self.cut3r, height, width) / 1e9,
            "head_flop_share": Cut3rSizes().head_flop_share,
            "cut3r_input": f"{height}x{width}",
        }

    def stand_in(self, height: int, width: int) -> tuple[StandInHead, Tensor]:
        """The head and its fixed input for ``height`` x ``width`` frames (built once)."""
        key = (height, width)
        if key not in self._heads:
            generator = torch.Generator().manual_seed(0)
            head = StandInHead(self.cut3r.dec_embed_dim, stand_in_hidden(self.cut3r, height, width), self.cut3r.patch_size)
            tokens = (height // self.cut3r.patch_size) * (width // self.cut3r.patch_size)
            self._heads[key] = (head.eval(), torch.randn(1, tokens, self.cut3r.dec_embed_dim, generator=generator))
        return self._heads[key]

    @torch.inference_mode()
    def run(self, video: Path, num_frames: int, questions: tuple[str, str], decode_tokens: int) -> BaselineRun:
        """Both questions the reference way; seconds per stage (names of ``measure.STAGES``)."""
        model, tokenizer = self.bundle.model, self.bundle.tokenizer
        s: dict[str, float] = {}
        start = time.perf_counter()
        stream = iter_frames(video, num_frames)
        frames, s["decode"] = elapsed(lambda: list(stream))
        images = [cut3r_input(f.rgb, self.config.cut3r_long_side) for f in frames]
        head, head_input = self.stand_in(*images[0].shape[-2:])

        def encode_3d() -> list[Tensor]:
            state, cameras = None, []
            for image in images:
                token, state = model.camera_encoder.step(image[None], state)
                cameras.append(model.heads.project_camera(token)[0])
                head(head_input)
            return cameras

        cameras, s["encode_3d"] = elapsed(encode_3d)
        s["encode_3d_per_frame"] = s["encode_3d"] / len(frames)
        pixels = siglip_input([f.rgb for f in frames], self.config.vision.image_size)
        vision, s["encode_vision"] = elapsed(lambda: model.vision.encode(pixels))
        prefix = build_video_prefix(
            tokenizer, len(frames), vision_tokens_per_frame(self.config), stream.info.duration_s,
            [f.timestamp_s for f in frames], video_end_tokens(self.config),
        )
        blocks = [torch.cat([c[None], v]) for c, v in zip(cameras, vision, strict=True)]
        video_embeds = torch.cat([*blocks, model.vision.video_end()])
        llm = TorchLLM(model.llm)

        def full_prompt(question: str) -> tuple[PrefillResult, int, int, float]:
            suffix = build_question_suffix(tokenizer, question)
            llm.reset()
            embeds = torch.cat([llm.embed(prefix.head_ids), video_embeds, llm.embed(prefix.tail_ids), llm.embed(suffix.ids)])
            result, seconds = elapsed(lambda: llm.prefill(embeds))
            int(torch.argmax(result.last_logits))  # the first token
            return result, prefix.length + suffix.pos_offset, prefix.length + suffix.ori_offset, seconds

        s["prefill_video"] = full_prompt(questions[0])[3]
        s["ttft_cold"] = time.perf_counter() - start
        (result, pos, ori, s["prefill_question"]), s["ttft_follow_up"] = elapsed(lambda: full_prompt(questions[1]))
        s["heads"] = time_heads(TorchHeads(self.bundle), result.hidden_states, pos, ori)
        s["decode_token"] = time_decode(llm, result.last_logits, decode_tokens)
        llm.reset()
        held = sum(f.rgb.nbytes for f in frames) / 2**20
        return BaselineRun(s, held)
