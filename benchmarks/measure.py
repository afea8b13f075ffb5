"""The stages every benchmark run reports, and the timers both the baseline and the
optimized paths share (so that a ratio compares the same measurement)."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import Tensor

from loc3r.errors import InternalError
from loc3r.runtime.generate import SamplingConfig, generate
from loc3r.runtime.stages import HeadsStage, LLMStage

# name -> what it measures (seconds, one question on one video)
STAGES: dict[str, str] = {
    "decode": "frames on the critical path (baselines: transformers' load_video decodes every frame up to the "
    "last sampled one; ours: waiting for the decoding thread, which seeks, skips and resizes ahead)",
    "preprocess": "resizing for CUT3R and SigLIP on the critical path (ours: in the decoding thread, so 0)",
    "encode_3d": "CUT3R camera path + f_cam, all frames",
    "encode_3d_per_frame": "encode_3d / frames",
    "encode_vision": "SigLIP + projector + pooling + row newlines, all frames",
    "heads": "f_pos + f_ori (circular soft-argmax) on <Pos>/<Ori>",
    "prefill_video": "LLM prefill of the video (transformers: the whole prompt + first token; "
    "with prefix cache: the video prefix once; ours: frame blocks as they are encoded)",
    "prefill_question": "what a follow-up question's prefill costs (transformers: the whole prompt again; "
    "with prefix cache: the question over the cached prefix, cropped back after; ours: the question over the cached prefix)",
    "ttft_cold": "video + question given together -> first token (ours: Answer.timings ttft_s)",
    "ttft_follow_up": "a second question on the same video -> first token",
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
    return per_token(stamps)


def per_token(stamps: list[float]) -> float:
    """Seconds per decode step from the times successive tokens arrived (the first token's
    stamp starts the clock): measured directly, never as a difference of two runs."""
    if len(stamps) < 2:
        raise InternalError(f"a decode rate needs 2 or more token times, got {len(stamps)}", "time 2 or more tokens")
    seconds = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    if not seconds > 0:  # a clock that did not advance (or NaN): never a rate from it
        raise InternalError(f"the clock did not advance over {len(stamps) - 1} decode steps", "report this with --debug")
    return seconds
