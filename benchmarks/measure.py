"""The stages every benchmark run reports, and the timers both the baseline and the
optimized paths share (so that a ratio compares the same measurement)."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor

from loc3r.runtime.generate import SamplingConfig, generate
from loc3r.runtime.stages import HeadsStage, LLMStage

# name -> what it measures (seconds, one question on one video)
STAGES: dict[str, str] = {
    "decode": "video decode + frame sampling, all frames",
    "encode_3d": "CUT3R step + f_cam, all frames (baseline: + stand-in DPT heads)",
    "encode_3d_per_frame": "encode_3d / frames",
    "encode_vision": "SigLIP + projector + pooling + newlines, all frames",
    "heads": "f_pos + f_ori (circular soft-argmax) on <Pos>/<Ori>",
    "prefill_video": "LLM prefill of the video prefix (baseline: the whole prompt, one pass)",
    "prefill_question": "LLM prefill a follow-up question costs (baseline: the whole prompt again)",
    "ttft_cold": "question -> first token, video processed in the same call",
    "ttft_follow_up": "second question on the same video -> first token",
    "decode_token": "one generated token at the prompt's context (1 / decode tok/s)",
}
FIRST_TOKEN = SamplingConfig(max_new_tokens=1)  # TTFT: ask returns once the first token is picked


def elapsed(fn: Callable[[], object]) -> tuple[object, float]:
    """``fn()`` and its wall-clock seconds."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def time_heads(heads: HeadsStage, hidden: Tensor, pos_index: int, ori_index: int, calls: int = 20) -> float:
    """Mean seconds of one ``f_pos``/``f_ori`` read-out (over ``calls``: it takes microseconds)."""

    def read_outs() -> None:
        for _ in range(calls):
            heads.pose(hidden[pos_index], hidden[ori_index])

    return elapsed(read_outs)[1] / calls


def time_decode(llm: LLMStage, first_logits: Tensor, tokens: int) -> float:
    """Seconds per generated token over ``tokens`` greedy steps (no stop token)."""
    stamps: list[float] = []
    generate(first_logits, llm.decode, set(), SamplingConfig(max_new_tokens=tokens), lambda _: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)
