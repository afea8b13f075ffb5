"""Tokenizer access (a Hugging Face ``tokenizer.json``) and the tiny BPE the demo bundle uses.

Text is always tokenized as plain text: :meth:`TextTokenizer.encode` never produces an added
or special token (``<|im_end|>``, ``<|video_pad|>``, ``<Pos>``, ... every one the tokenizer
has), whatever the text holds, so a question can never inject chat structure. Control
tokens enter a prompt only by id (see ``loc3r.models.prompt``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from loc3r.errors import ModelError
from loc3r.native_stderr import held_stderr

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
POS_TOKEN = "<Pos>"
ORI_TOKEN = "<Ori>"
# Chat and Loc3R special tokens; the first three are Qwen2's own.
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, POS_TOKEN, ORI_TOKEN)

# Qwen2's pre-tokenizer split: newlines never merge with the letters that follow them,
# which is what lets the prompt be tokenized in separate chunks without changing ids.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TextTokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids the runtime needs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._plain = plain_text_tokenizer(tokenizer)
        self.control_ids = frozenset(tokenizer.get_added_tokens_decoder())
        self.im_start_id = self.token_id(IM_START)
        self.im_end_id = self.token_id(IM_END)
        self.end_of_text_id = self.token_id(END_OF_TEXT)
        self.pos_id = self.token_id(POS_TOKEN)
        self.ori_id = self.token_id(ORI_TOKEN)

    @classmethod
    def from_dir(cls, bundle_dir: str | Path) -> TextTokenizer:
        path = Path(bundle_dir) / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{bundle_dir} has no tokenizer.json", "re-create the bundle")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ModelError(f"{path} is not a readable tokenizer ({str(exc).splitlines()[0]})", "re-create the bundle") from None
        return cls(tokenizer)

    def token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelError(
                f"tokenizer has no {token} token",
                "convert the checkpoint with loc3r-convert, which adds the Loc3R tokens",
            )
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def largest_id(self) -> int:
        """The largest token id: the LLM's embedding needs a row for it."""
        return max(self._tokenizer.get_vocab(with_added_tokens=True).values())

    @cached_property
    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for (byte-level vocabularies spell a byte
        as one character): text of B bytes is at least B / this many tokens."""
        return max((len(token.encode("utf-8")) for token in self._tokenizer.get_vocab(with_added_tokens=False)), default=1)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` read as plain text: never an added or special token's id."""
        with held_stderr():  # a Rust panic on a crafted text: one error line, not a backtrace
            ids = self._plain.encode(text, add_special_tokens=False).ids
        control = self.control_ids.intersection(ids)
        if control:  # only a tokenizer whose ordinary vocabulary holds a control token gets here
            token = self.id_to_token(min(control))
            raise ModelError(f"the tokenizer turns plain text into its control token {token}", "re-create the bundle's tokenizer.json")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, bundle_dir: str | Path) -> None:
        self._tokenizer.save(str(Path(bundle_dir) / "tokenizer.json"))


def plain_text_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of ``tokenizer`` that knows no added tokens (so none is matched in text), and
    neither pads nor truncates."""
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = []
    plain = Tokenizer.from_str(json.dumps(data))
    plain.no_padding()
    plain.no_truncation()
    return plain


def qwen2_tokenizer(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None) -> Tokenizer:
    """Qwen2's byte-level BPE over ``vocab`` and ``merges`` (empty: to be trained), with the
    normalizer (NFC), pre-tokenizer (split + byte level), post-processor and decoder of
    Qwen2's ``tokenizer.json``; added tokens are the caller's."""
    model = models.BPE(
        vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False,
    ) if vocab is not None else models.BPE()
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tiny_tokenizer(lines: Iterable[str], vocab_size: int = 512) -> TextTokenizer:
    """Train a byte-level BPE with Qwen2's pre-tokenizer on ``lines`` (deterministic)."""
    tokenizer = qwen2_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    return TextTokenizer(tokenizer)
