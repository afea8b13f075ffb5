"""The bundle tokenizer: the checkpoint's Qwen2 tokenizer plus ``<Pos>`` and ``<Ori>``.

The tokenizer is built from data files only, never from code a checkpoint ships
(``auto_map``, ``tokenization_*.py``) nor through transformers' ``AutoTokenizer``:

- ``tokenizer.json`` when present (the ``tokenizers`` library reads it);
- else Qwen2's byte-level BPE (:func:`qwen2_tokenizer`) over ``vocab.json`` + ``merges.txt``,
  with the added tokens of ``tokenizer_config.json`` (``added_tokens_decoder``),
  ``added_tokens.json`` and ``special_tokens_map.json``, at their stated ids.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE

from loc3r.errors import ModelError
from loc3r.fileio import read_json_object
from loc3r.models.tokenizer import ORI_TOKEN, POS_TOKEN, TextTokenizer, qwen2_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
VOCAB_FILES = ("vocab.json", "merges.txt")
QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
_FIX = "copy the checkpoint's tokenizer files (tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json)"


@dataclass(frozen=True)
class AddedTokenSpec:
    """One added token as the checkpoint's files state it."""

    content: str
    id: int
    special: bool
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False

    def token(self) -> AddedToken:
        return AddedToken(self.content, single_word=self.single_word, lstrip=self.lstrip, rstrip=self.rstrip,
                          normalized=self.normalized, special=self.special)


def read_tokenizer(folder: Path) -> Tokenizer:
    """The checkpoint's tokenizer from its data files (see the module docstring)."""
    path = folder / TOKENIZER_JSON
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ModelError(f"{path} is not a readable tokenizer ({str(exc).splitlines()[0]})", _FIX) from None
    missing = [name for name in VOCAB_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(
            f"{folder} has no tokenizer: it needs {TOKENIZER_JSON}, or {' + '.join(VOCAB_FILES)} "
            f"(missing: {TOKENIZER_JSON}, {', '.join(missing)})",
            _FIX,
        )
    return tokenizer_from_vocab(folder)


def tokenizer_from_vocab(folder: Path) -> Tokenizer:
    """Qwen2's tokenizer from ``vocab.json`` + ``merges.txt`` + the added-token files."""
    settings = _json(folder / "tokenizer_config.json")
    tokenizer_class = settings.get("tokenizer_class")
    if tokenizer_class is not None and tokenizer_class not in QWEN2_CLASSES:
        raise ModelError(
            f"{folder}/tokenizer_config.json names {tokenizer_class!r}; only Qwen2's byte-level BPE is built "
            f"from {' + '.join(VOCAB_FILES)}",
            f"add the checkpoint's {TOKENIZER_JSON}",
        )
    if settings.get("add_prefix_space"):
        raise ModelError(f"{folder}/tokenizer_config.json sets add_prefix_space, which Qwen2 does not",
                         f"add the checkpoint's {TOKENIZER_JSON}")
    try:
        vocab, merges = BPE.read_file(*(str(folder / name) for name in VOCAB_FILES))
        added = added_tokens(folder, settings, vocab)
        # Each added token gets its stated id through the model's vocabulary; the added
        # vocabulary then matches it (as a tokenizer.json's ``added_tokens`` would).
        tokenizer = qwen2_tokenizer({**vocab, **{t.content: t.id for t in added}}, merges)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise ModelError(f"{folder}: {' + '.join(VOCAB_FILES)} are not readable ({str(exc).splitlines()[0]})", _FIX) from None
    tokenizer.add_special_tokens([t.token() for t in added if t.special])
    tokenizer.add_tokens([t.token() for t in added if not t.special])
    wrong = [t for t in added if tokenizer.token_to_id(t.content) != t.id]
    if wrong:
        raise ModelError(f"{folder}: added token {wrong[0].content!r} could not take id {wrong[0].id}", _FIX)
    return tokenizer


def added_tokens(folder: Path, settings: dict[str, Any], vocab: dict[str, int]) -> list[AddedTokenSpec]:
    """Added tokens in id order, merged from the three files that may state them.

    ``added_tokens_decoder`` gives ids and flags; ``added_tokens.json`` ids; the special
    tokens of ``special_tokens_map.json`` not stated elsewhere take the next free ids,
    as transformers adds them.
    """
    found: dict[str, AddedTokenSpec] = {}

    def add(spec: AddedTokenSpec, where: str) -> None:
        known = found.get(spec.content)
        in_vocab = vocab.get(spec.content)
        if (known is not None and known.id != spec.id) or (in_vocab is not None and in_vocab != spec.id):
            other = known.id if known is not None else in_vocab
            raise ModelError(f"{folder}: {where} gives {spec.content!r} id {spec.id}, elsewhere it is {other}", _FIX)
        found[spec.content] = spec if known is None else known

    decoder = settings.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ModelError(f"{folder}/tokenizer_config.json: added_tokens_decoder is not an object", _FIX)
    for key, entry in decoder.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not str(key).isdigit():
            raise ModelError(f"{folder}/tokenizer_config.json: added_tokens_decoder[{key!r}] is malformed", _FIX)
        flags = {name: bool(entry.get(name, False)) for name in ("special", "lstrip", "rstrip", "normalized", "single_word")}
        add(AddedTokenSpec(entry["content"], int(key), **flags), "tokenizer_config.json")
    for content, token_id in _json(folder / "added_tokens.json").items():
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise ModelError(f"{folder}/added_tokens.json: {content!r} has id {token_id!r}", _FIX)
        add(AddedTokenSpec(content, token_id, special=False), "added_tokens.json")
    next_id = max([len(vocab), *(t.id + 1 for t in found.values()), *(i + 1 for i in vocab.values())])
    for content in _special_contents(folder):
        if content in found:
            found[content] = dataclasses.replace(found[content], special=True)
        elif content in vocab:
            add(AddedTokenSpec(content, vocab[content], special=True), "special_tokens_map.json")
        else:
            add(AddedTokenSpec(content, next_id, special=True), "special_tokens_map.json")
            next_id += 1
    return sorted(found.values(), key=lambda t: t.id)


def _special_contents(folder: Path) -> list[str]:
    """The token strings ``special_tokens_map.json`` names (a string or ``{"content": ...}``)."""
    contents = []
    for value in _json(folder / "special_tokens_map.json").values():
        for item in value if isinstance(value, list) else [value]:
            content = item.get("content") if isinstance(item, dict) else item
            if not isinstance(content, str):
                raise ModelError(f"{folder}/special_tokens_map.json: {item!r} is not a token", _FIX)
            contents.append(content)
    return list(dict.fromkeys(contents))


def _json(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when it is absent."""
    return read_json_object(path, _FIX) if path.is_file() else {}


def loc3r_tokenizer(folder: Path, vocab_size: int) -> TextTokenizer:
    """The checkpoint's tokenizer with ``<Pos>``/``<Ori>`` added as special tokens when
    absent; every id must have a row in the LLM's embedding (``vocab_size`` rows)."""
    tokenizer = read_tokenizer(folder)
    missing = [token for token in (POS_TOKEN, ORI_TOKEN) if tokenizer.token_to_id(token) is None]
    if missing:
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
        log.info("added %s to the tokenizer", " and ".join(missing))
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if largest >= vocab_size:
        raise ModelError(
            f"token id {largest} does not fit the LLM's {vocab_size}-row embedding"
            + (f" (after adding {', '.join(missing)})" if missing else ""),
            "use a checkpoint whose embedding has spare rows for <Pos> and <Ori>",
        )
    return TextTokenizer(tokenizer)
