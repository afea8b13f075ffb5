"""The bundle tokenizer: the checkpoint's Qwen2 tokenizer plus ``<Pos>`` and ``<Ori>``."""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from loc3r.errors import ModelError
from loc3r.models.tokenizer import ORI_TOKEN, POS_TOKEN, TextTokenizer

log = logging.getLogger(__name__)


def read_tokenizer(folder: Path) -> Tokenizer:
    """``tokenizer.json`` of ``folder``, else the Qwen2 tokenizer built from ``vocab.json`` +
    ``merges.txt`` (+ the added tokens of ``tokenizer_config.json``). Data files only: a
    tokenizer class named by ``auto_map`` (custom code in the checkpoint) is never loaded."""
    path = folder / "tokenizer.json"
    try:
        if path.is_file():
            return Tokenizer.from_file(str(path))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            from transformers import Qwen2Tokenizer  # a concrete class: auto_map is not consulted

            return Qwen2Tokenizer.from_pretrained(str(folder)).backend_tokenizer
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ModelError(
            f"cannot read the tokenizer in {folder} ({exc})", "download the checkpoint's tokenizer files again"
        ) from None
    raise ModelError(f"{folder} has no tokenizer.json (nor vocab.json + merges.txt)", "download the checkpoint's tokenizer files")


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
