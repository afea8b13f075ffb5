"""The generation loop: greedy, sampling, stop tokens, limits."""

from __future__ import annotations

import numpy as np
import torch

from loc3r.runtime.generate import SamplingConfig, generate, pick_token


def scripted(sequence: list[int], vocab: int = 10):
    """A fake LLM whose next-token logits peak on ``sequence`` in order."""
    calls: list[int] = []

    def logits_for(step: int) -> torch.Tensor:
        out = torch.zeros(vocab)
        out[sequence[min(step, len(sequence) - 1)]] = 5.0
        return out

    def decode_step(token: int) -> torch.Tensor:
        calls.append(token)
        return logits_for(len(calls))

    return logits_for(0), decode_step, calls


def test_greedy_stops_before_the_stop_token() -> None:
    first, step, calls = scripted([3, 4, 5, 9, 1])
    tokens = generate(first, step, stop_ids={9}, sampling=SamplingConfig(max_new_tokens=10))
    assert tokens == [3, 4, 5]
    assert calls == [3, 4, 5]


def test_max_new_tokens_bounds_output_and_decode_calls() -> None:
    first, step, calls = scripted([2, 2, 2, 2, 2, 2])
    seen: list[int] = []
    tokens = generate(first, step, stop_ids={9}, sampling=SamplingConfig(max_new_tokens=4), on_token=seen.append)
    assert tokens == [2, 2, 2, 2] == seen
    assert len(calls) == 3  # the last token is never fed back


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    gen = np.random.default_rng(0)
    picks = {pick_token(logits, SamplingConfig(temperature=1.0, top_p=0.8), gen) for _ in range(300)}
    assert picks == {0, 1}
    picks = {pick_token(logits, SamplingConfig(temperature=1.0, top_p=0.5), gen) for _ in range(100)}
    assert picks == {0}


def test_sampling_is_reproducible_per_seed() -> None:
    logits = torch.zeros(50)

    def run(seed: int) -> list[int]:
        return generate(logits, lambda t: logits, set(), SamplingConfig(max_new_tokens=8, temperature=1.0, seed=seed))

    assert run(1) == run(1)
    assert run(1) != run(2)
