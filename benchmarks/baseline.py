"""The baselines: what a user would run without loc3r, in the same process as our runtime.

Both are transformers' own pieces over the bundle's weights, in the bundle's PyTorch
precision (fp32 on a CPU), eager (SDPA), nothing overlapped, one video and two questions:

1. decode: transformers' ``load_video`` (PyAV backend: every frame decoded up to the last
   sampled one, the sampled ones converted to RGB) at LLaVA-Video's linspace indices;
2. preprocess: CUT3R's resize and crop, SigLIP's 384x384 resize (PIL, as the references);
3. encode_3d: CUT3R's camera path, one recurrent step per frame, + ``f_cam`` (the
   bundle's module, equal to the reference code; the DPT/pose heads are not run: a VLM
   user does not need them);
4. encode_vision: ``LlavaOnevisionForConditionalGeneration.get_video_features`` on all
   frames at once (SigLIP, projector, bilinear pooling), then LLaVA-Video's layout built
   by hand as ``inputs_embeds`` in the bundle's video layout (LLaVA-Video: a newline after
   every row, where transformers' llava-onevision puts one newline per video), each frame's
   camera token first and the video-end tokens after the last frame;
5. the LLM through ``generate(inputs_embeds=..., max_new_tokens=1)``:
   - ``transformers``: the whole prompt (video + question) for every question;
   - ``transformers + prefix cache``: the video prefix's KV computed once into a
     ``DynamicCache``, every question generated on it and the cache cropped back to the
     prefix afterwards (``DynamicCache.crop``: cheaper than transformers' documented
     ``copy.deepcopy`` of the cache, so the baseline gets its best setting).

Both share steps 1-4 of a repeat (they are the same work); step 5 runs for each. A
baseline's ``ttft_cold`` is steps 1-4 plus its own cold question, back to back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import DynamicCache, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.generation.streamers import BaseStreamer
from transformers.video_utils import VideoMetadata, load_video

from loc3r.bench.measure import elapsed, per_token, time_heads
from loc3r.errors import InputError
from loc3r.models.bundle import Bundle
from loc3r.models.config import ONEVISION_VIDEO, Loc3rConfig
from loc3r.models.llm import qwen2_config
from loc3r.models.prompt import build_question_suffix, build_video_prefix
from loc3r.models.vision import layout_tokens, siglip_config, video_end_tokens, vision_tokens_per_frame
from loc3r.runtime.preprocess import cut3r_input, siglip_input
from loc3r.runtime.torch_backend import TorchCamera, TorchHeads
from loc3r.runtime.video import sample_indices


def llava_onevision(bundle: Bundle) -> LlavaOnevisionForConditionalGeneration:
    """transformers' llava-onevision holding the bundle's vision and LLM weights (shared,
    not copied). Its tower keeps the used layers only and selects the last one, as the
    published -hf checkpoints do."""
    config = bundle.config
    pooling, transformers_pooling = (config.spatial_pool_mode, config.spatial_pool_stride), ONEVISION_VIDEO[:2]
    if pooling != transformers_pooling:
        raise InputError(
            f"transformers' llava-onevision pools {transformers_pooling[0]} by {transformers_pooling[1]}; "
            f"{config.model_id} pools {pooling[0]} by {pooling[1]}",
            "benchmark a bundle with LLaVA-Video's pooling (bilinear, stride 2)",
        )
    model = LlavaOnevisionForConditionalGeneration(onevision_config(config)).eval()
    ours = bundle.model
    weights = {f"model.vision_tower.{k}": t for k, t in ours.vision.tower.state_dict().items()}
    weights |= {f"model.multi_modal_projector.linear_{1 + int(k[0]) // 2}.{k[2:]}": t for k, t in ours.vision.projector.state_dict().items()}
    weights |= {f"model.language_model.{k}": t for k, t in ours.llm.model.state_dict().items()}
    weights |= {"model.image_newline": ours.vision.image_newline.data, "lm_head.weight": ours.llm.lm_head.weight.data}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    unused = {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}  # after the selected layer
    if set(missing) - unused or unexpected:
        raise RuntimeError(f"llava-onevision weights do not match the bundle: missing {missing}, unexpected {unexpected}")
    return model.to(bundle.precision.device)


def onevision_config(config: Loc3rConfig) -> LlavaOnevisionConfig:
    vocab = config.llm.vocab_size
    return LlavaOnevisionConfig(
        vision_config=siglip_config(config),
        text_config=qwen2_config(config.llm),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_token_index=vocab - 2,  # unused: the prompt goes in as inputs_embeds
        video_token_index=vocab - 1,
    )


@dataclass
class BaselineRun:
    """One repeat: stage seconds per baseline, and the MiB of RGB frames held."""

    seconds: dict[str, dict[str, float]]
    frames_in_memory_mib: float


class Baseline:
    """Both baselines over one bundle (see the module docstring)."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.config = bundle.config
        self.model = llava_onevision(bundle)
        self.camera = TorchCamera(bundle)
        self.heads = TorchHeads(bundle)
        self.llm_format = f"torch {bundle.precision.dtype_name} (transformers generate, SDPA)"

    @torch.inference_mode()
    def run(self, video: Path, num_frames: int, questions: tuple[str, str], decode_tokens: int) -> BaselineRun:
        """Both questions both ways; seconds per stage (names of ``measure.STAGES``)."""
        start = time.perf_counter()
        shared: dict[str, float] = {}
        (rgbs, metadata), shared["decode"] = elapsed(lambda: self.decode(video, num_frames))
        (images, pixels), shared["preprocess"] = elapsed(lambda: self.preprocess(rgbs))
        cameras, shared["encode_3d"] = elapsed(lambda: self.encode_3d(images))
        shared["encode_3d_per_frame"] = shared["encode_3d"] / len(rgbs)
        vision, shared["encode_vision"] = elapsed(lambda: self.encode_vision(pixels))
        tokenizer = self.bundle.tokenizer
        times = [int(i) / metadata.fps for i in metadata.frames_indices]
        prefix = build_video_prefix(
            tokenizer, len(rgbs), vision_tokens_per_frame(self.config), metadata.duration, times, video_end_tokens(self.config)
        )
        table = self.model.get_input_embeddings()
        prefix_embeds = torch.cat([
            table(torch.tensor(prefix.head_ids)),
            self.video_embeds(cameras, vision),
            table(torch.tensor(prefix.tail_ids)),
        ])
        suffixes = [build_question_suffix(tokenizer, q) for q in questions]
        prompts = [torch.cat([prefix_embeds, table(torch.tensor(s.ids))])[None] for s in suffixes]
        video_s = time.perf_counter() - start

        plain = dict(shared)
        plain["prefill_video"] = self.first_token(prompts[0])  # the whole prompt, first token
        plain["ttft_cold"] = time.perf_counter() - start
        plain["prefill_question"] = plain["ttft_follow_up"] = self.first_token(prompts[1])

        cached = dict(shared)
        cache, cached["prefill_video"] = elapsed(lambda: self.prefix_cache(prefix_embeds))
        cached["ttft_cold"] = video_s + cached["prefill_video"] + self.first_token(prompts[0], cache)
        cached["prefill_question"] = cached["ttft_follow_up"] = self.first_token(prompts[1], cache)

        hidden = self.model.model.language_model(inputs_embeds=prompts[1][:, prefix.length :], cache=cache).last_hidden_state[0]
        crop_to(cache, prefix.length)
        heads = time_heads(self.heads, hidden, suffixes[1].pos_offset, suffixes[1].ori_offset)
        decode_token = self.decode_per_token(prompts[1], cache, decode_tokens)
        for side in (plain, cached):
            side["heads"], side["decode_token"] = heads, decode_token
        held = sum(rgb.nbytes for rgb in rgbs) / 2**20
        return BaselineRun({"transformers": plain, "transformers_prefix_cache": cached}, held)

    def decode(self, video: Path, num_frames: int) -> tuple[list[np.ndarray], VideoMetadata]:
        """transformers' ``load_video`` (PyAV) at LLaVA-Video's indices; frames and metadata."""
        frames, metadata = load_video(
            str(video), backend="pyav", sample_indices_fn=lambda metadata, **_: sample_indices(metadata.total_num_frames, num_frames)
        )
        return list(frames), metadata

    def preprocess(self, rgbs: list[np.ndarray]) -> tuple[list[Tensor], Tensor]:
        """CUT3R inputs (one per frame) and SigLIP pixels (all frames), PIL resizes."""
        images = [cut3r_input(rgb, self.config.cut3r_long_side) for rgb in rgbs]
        return images, siglip_input(rgbs, self.config.vision.image_size)

    def encode_3d(self, images: list[Tensor]) -> list[Tensor]:
        """CUT3R's camera path frame by frame, as the reference runs it (encoder, then the
        recurrent step), + ``f_cam``."""
        state, cameras = None, []
        for image in images:
            (encoded,) = self.camera.encode_frames(image[None])
            camera, state = self.camera.step(encoded, state)
            cameras.append(camera)
        return cameras

    def encode_vision(self, pixels: Tensor) -> Tensor:
        """transformers' video features, laid out per frame in the bundle's layout (the
        video-end tokens go after the last frame, in ``run``)."""
        precision = self.bundle.precision
        features = self.model.model.get_video_features(pixel_values_videos=pixels[None].to(precision.device, precision.dtype)).pooler_output[0]
        frames = pixels.shape[0]
        side = int(round(((features.shape[0] - 1) // frames) ** 0.5))  # the last token is its per-video newline
        pooled = features[:-1].reshape(frames, side, side, -1)
        return layout_tokens(pooled, self.model.model.image_newline, self.config.newline_position)

    def video_embeds(self, cameras: list[Tensor], vision: Tensor) -> Tensor:
        """The frame blocks ``[camera, vision...]`` in order, then the video-end tokens."""
        blocks = [torch.cat([c[None], v]) for c, v in zip(cameras, vision, strict=True)]
        return torch.cat([*blocks, self.model.model.image_newline.expand(video_end_tokens(self.config), -1)])

    def prefix_cache(self, prefix_embeds: Tensor) -> DynamicCache:
        """The video prefix's KV, computed once."""
        cache = DynamicCache()
        self.model(inputs_embeds=prefix_embeds[None], cache=cache, logits_to_keep=1)
        return cache

    def first_token(self, prompt: Tensor, cache: DynamicCache | None = None) -> float:
        """Seconds of ``generate`` for the first new token (on ``cache`` if given)."""
        start = time.perf_counter()
        self.generate(prompt, cache, 1)
        return time.perf_counter() - start

    def decode_per_token(self, prompt: Tensor, cache: DynamicCache, tokens: int) -> float:
        """Seconds per decode step of ``generate``, from the times its streamer received each
        of ``1 + tokens`` new tokens (the first one, after the prefill, starts the clock)."""
        clock = TokenClock()
        self.generate(prompt, cache, 1 + tokens, clock)
        return per_token(clock.stamps)

    def generate(self, prompt: Tensor, cache: DynamicCache | None, tokens: int, streamer: BaseStreamer | None = None) -> None:
        """Greedy ``generate`` of exactly ``tokens`` new tokens (on ``cache`` if given, which
        is cropped back to its prefix afterwards)."""
        kwargs = {"cache": cache} if cache is not None else {}
        prefix = cache.get_seq_length() if cache is not None else 0
        try:
            self.model.generate(
                inputs_embeds=prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0, streamer=streamer, **kwargs
            )
        finally:
            if cache is not None:
                crop_to(cache, prefix)


def crop_to(cache: DynamicCache, length: int) -> None:
    """Cut ``cache`` back to its first ``length`` positions (transformers' ``crop`` takes
    the number of positions to drop, negated)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class TokenClock(BaseStreamer):
    """A ``generate`` streamer that stamps the time each new token arrives (``generate``
    pushes the prompt first: that push is not a token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value: Tensor) -> None:
        now = time.perf_counter()
        if self._prompt_seen:
            self.stamps.append(now)
        self._prompt_seen = True

    def end(self) -> None:
        pass
