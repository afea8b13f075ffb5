"""Token generation over any LLM that maps the last token to next-token logits.

torch is imported where a token is picked, so the command line's argument parsing (which
uses ``SamplingConfig`` and ``TextStream``) does not load it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loc3r.errors import InputError, InternalError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from loc3r.models.tokenizer import TextTokenizer

TEMPERATURE_RANGE = (0.01, 100.0)  # besides 0 (greedy): beyond it the softmax under/overflows
SEED_LIMIT = 2**64  # torch seeds are 64-bit


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


def pick_token(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator) -> int:
    """Choose the next token from logits (vocab,).

    Non-finite logits never reach the sampler: ``+inf`` (an FP16 engine's overflow of a very
    likely token) makes the tokens that have it the only candidates, sharing the choice; NaN,
    or every logit ``-inf``, is a broken model: an :class:`InternalError`, not a token.
    """
    import torch

    logits = logits.double()  # float64: a top_p below float32's smallest number (1e-300) is not 0, and sums stay exact enough
    if not bool(torch.isfinite(logits).all()):
        if bool(torch.isnan(logits).any()):
            raise InternalError("the model's next-token logits hold NaN", "the model or its engine is broken: rebuild it, or run with --backend torch")
        if bool((logits == float("inf")).any()):
            logits = torch.where(logits == float("inf"), 0.0, float("-inf"))  # the overflowed tokens alone, equally likely
        elif bool((logits == float("-inf")).all()):
            raise InternalError("the model gave every next token probability 0 (all logits -inf)", "the model or its engine is broken")
    if sampling.temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
    keep[0] = True  # the most likely token always stays: the nucleus is never empty
    sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


def generate(
    first_logits: Tensor,
    decode_step: Callable[[int], Tensor],
    stop_ids: set[int],
    sampling: SamplingConfig,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate from the prompt's last logits until a stop token or ``max_new_tokens``.

    The stop token is not returned; ``decode_step(token)`` feeds a token and returns the
    next logits.
    """
    import torch

    generator = torch.Generator().manual_seed(sampling.seed)
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
