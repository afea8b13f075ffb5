"""Token generation over any LLM that maps the last token to next-token logits.

Tokens are picked in numpy from either backend's logits, so neither the command line's
argument parsing nor the exported-graph runtimes load torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loc3r.errors import InputError, InternalError
from loc3r.runtime.arrays import Array, to_numpy

if TYPE_CHECKING:
    from loc3r.models.tokenizer import TextTokenizer

TEMPERATURE_RANGE = (0.01, 100.0)  # besides 0 (greedy): beyond it the softmax under/overflows
SEED_LIMIT = 2**64  # seeds are 64-bit


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when ``temperature == 0``; otherwise temperature + nucleus (top-p) sampling.

    Values are checked here (an ``InputError`` names the ``loc3r-run`` flag), so nothing
    non-finite or out of range reaches the sampler.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = TEMPERATURE_RANGE
        if not _number(self.temperature) or not (self.temperature == 0 or low <= self.temperature <= high):
            raise InputError(f"--temperature {self.temperature} is out of range", f"use 0 (greedy) or a number from {low} to {high:g}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"--top-p {self.top_p} is out of range", "use a number above 0 and at most 1 (1 keeps every token)")
        if not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise InputError(f"--seed {self.seed} is out of range", f"use a whole number from 0 to {SEED_LIMIT - 1}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens {self.max_new_tokens} is out of range", "use a whole number of at least 1")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pick_token(logits: Array, sampling: SamplingConfig, generator: np.random.Generator) -> int:
    """Choose the next token from logits (vocab,): the first of the largest when greedy.

    Non-finite logits never reach the sampler: ``+inf`` (an FP16 engine's overflow of a very
    likely token) makes the tokens that have it the only candidates, sharing the choice; NaN,
    or every logit ``-inf``, is a broken model: an :class:`InternalError`, not a token.
    """
    # float64: a top_p below float32's smallest number (1e-300) is not 0, and sums stay exact enough
    values = to_numpy(logits).astype(np.float64).reshape(-1)
    if not np.isfinite(values).all():
        if np.isnan(values).any():
            raise InternalError("the model's next-token logits hold NaN", "the model or its engine is broken: rebuild it, or run with --backend torch")
        if (values == np.inf).any():
            values = np.where(values == np.inf, 0.0, -np.inf)  # the overflowed tokens alone, equally likely
        elif (values == -np.inf).all():
            raise InternalError("the model gave every next token probability 0 (all logits -inf)", "the model or its engine is broken")
    if sampling.temperature <= 0.0:
        return int(np.argmax(values))
    scaled = values / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    keep = np.cumsum(sorted_probs) - sorted_probs < sampling.top_p
    keep[0] = True  # the most likely token always stays: the nucleus is never empty
    sorted_probs = np.where(keep, sorted_probs, 0.0)
    return int(order[generator.choice(len(order), p=sorted_probs / sorted_probs.sum())])


def generate(
    first_logits: Array,
    decode_step: Callable[[int], Array],
    stop_ids: set[int],
    sampling: SamplingConfig,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate from the prompt's last logits until a stop token or ``max_new_tokens``.

    The stop token is not returned; ``decode_step(token)`` feeds a token and returns the
    next logits (a numpy array or a tensor). Sampling draws from numpy's PCG64 seeded with
    ``sampling.seed``, the same on every backend.
    """
    generator = np.random.default_rng(sampling.seed)
    tokens: list[int] = []
    logits = first_logits
    while len(tokens) < sampling.max_new_tokens:
        token = pick_token(logits, sampling, generator)
        if token in stop_ids:
            break
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(tokens) < sampling.max_new_tokens:
            logits = decode_step(token)
    return tokens


class TextStream:
    """The text of generated tokens as they arrive: ``push`` returns what is new, holding
    back an incomplete UTF-8 sequence until the token that completes it."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        delta, self.shown = text[self.shown :], len(text)
        return delta
