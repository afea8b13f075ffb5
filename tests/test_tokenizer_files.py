"""The checkpoint tokenizer is built from data files only, and gives Qwen2's ids.

A Qwen2-shaped tokenizer (trained vocabulary, chat tokens added after it) is written in
both folder shapes a checkpoint may have: ``tokenizer.json``, and LLaVA-NeXT's Qwen2 slow
files (``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` + ``added_tokens.json`` +
``special_tokens_map.json``). Built from the second, it must give exactly the ids of the
first, and of transformers' own ``Qwen2Tokenizer`` over the same files, on text that
exercises every part of Qwen2's pipeline: NFC, the split regex (contractions, letters,
single digits, punctuation runs, whitespace runs, newlines) and the added tokens.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import Qwen2Tokenizer

from llava_checkpoints import (
    QWEN2_CHAT_TOKENS,
    assert_one_line_error,
    convert,
    next_folder,
    tokenizer_without_loc3r_tokens,
    write_cut3r_file,
    write_tokenizer,
)
from loc3r.errors import ModelError
from loc3r.models.convert_tokenizer import loc3r_tokenizer, read_tokenizer
from loc3r.models.tokenizer import END_OF_TEXT, IM_END, IM_START

SAMPLES = [
    "Where am I standing? The chair is left of the table.",
    "I'll say it: DON'T, you're, we've, she'd, it's, THEY'RE.",
    "Numbers 1234567890 and 3.14159, 1,000,000 and 2024-06-01.",
    "spaces:  two,   three,\t\ttabs, \t mixed   ",
    "\n\nnewlines\n\n\nrun\r\nwindows\r\n  indented\n\t\ttabbed",
    "café, cafe\u0301 (decomposed), naïve, Ångström, ﬁ ligature",
    "中文字符和日本語のテキスト, 한국어, Ελληνικά, русский",
    "emoji 🙂🚀👍🏽 and symbols ©®™ ∑∫√ ≠ ≤",
    "punctuation!!! ??? ... --- ((nested)) [brackets] {braces} <angle>",
    f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{IM_START}user\nhi{IM_END}\n{END_OF_TEXT}",
    f"glued{IM_START}tokens{IM_END}x and <|im_start |> lookalikes <|im_end|",
    "",
    " ",
    "x" * 300,
]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    corpus = resources.files("loc3r").joinpath("assets/corpus.txt").read_text(encoding="utf-8").splitlines()
    return tokenizer_without_loc3r_tokens(corpus + SAMPLES * 3, vocab_size=697)


@pytest.fixture(scope="module")
def folders(trained: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for shape in ("tokenizer.json", "vocab+merges"):
        folder = tmp_path_factory.mktemp(shape.replace("+", "_"))
        write_tokenizer(folder, trained, shape)
        out[shape] = folder
    return out


def test_vocab_files_give_the_ids_of_tokenizer_json(folders: dict[str, Path]) -> None:
    reference = Tokenizer.from_file(str(folders["tokenizer.json"] / "tokenizer.json"))
    built = read_tokenizer(folders["vocab+merges"])
    assert not (folders["vocab+merges"] / "tokenizer.json").exists()
    for text in SAMPLES:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert built.encode(text, add_special_tokens=False).ids == expected, text
        assert built.decode(expected, skip_special_tokens=False) == reference.decode(expected, skip_special_tokens=False)
        assert built.decode(expected) == reference.decode(expected)
    assert built.get_vocab(with_added_tokens=True) == reference.get_vocab(with_added_tokens=True)
    assert [built.token_to_id(t) for t in QWEN2_CHAT_TOKENS] == [697, 698, 699]


def test_vocab_files_match_transformers_qwen2_tokenizer(folders: dict[str, Path]) -> None:
    """transformers' Qwen2Tokenizer (its own construction from vocab.json + merges.txt) agrees."""
    ours = read_tokenizer(folders["vocab+merges"])
    theirs = Qwen2Tokenizer.from_pretrained(str(folders["vocab+merges"]))
    for text in SAMPLES:
        assert ours.encode(text, add_special_tokens=False).ids == theirs(text, add_special_tokens=False)["input_ids"], text


def test_pipeline_parts_are_qwen2s(folders: dict[str, Path]) -> None:
    """Checks that fail if a part is missing: NFC, one token per digit, newline runs apart."""
    built = read_tokenizer(folders["vocab+merges"])
    assert built.encode("cafe\u0301").ids == built.encode("café").ids
    digits = built.encode("1234567890").tokens
    assert digits == list("1234567890")
    assert built.encode("a\n\nb").tokens == ["a", "ĊĊ", "b"]
    assert built.encode(f"x{IM_START}y").ids[1] == built.token_to_id(IM_START)


@pytest.mark.parametrize("shape", ["tokenizer.json", "vocab+merges"])
def test_bundle_tokens_are_the_same_for_both_shapes(folders: dict[str, Path], shape: str) -> None:
    tokenizer = loc3r_tokenizer(folders[shape], vocab_size=704)
    assert (tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.end_of_text_id) == (698, 699, 697)
    assert (tokenizer.pos_id, tokenizer.ori_id) == (700, 701)


# --- no checkpoint code, clear errors -----------------------------------------------------

EVIL = """import pathlib
pathlib.Path(__file__).with_name("CODE_RAN").write_text("yes")
from transformers import PreTrainedTokenizer
class EvilTokenizer(PreTrainedTokenizer):
    pass
"""


@pytest.mark.parametrize("shape", ["tokenizer.json", "vocab+merges"])
def test_checkpoint_code_never_runs(trained: Tokenizer, tmp_path: Path, shape: str) -> None:
    write_tokenizer(tmp_path, trained, shape)
    (tmp_path / "tokenization_evil.py").write_text(EVIL)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    if shape == "tokenizer.json":
        config["tokenizer_class"] = "EvilTokenizer"  # ignored: tokenizer.json is data
        config_path.write_text(json.dumps(config))
        assert read_tokenizer(tmp_path).token_to_id(IM_END) == 699
    else:
        config_path.write_text(json.dumps({**config, "tokenizer_class": "EvilTokenizer"}))
        with pytest.raises(ModelError, match="names 'EvilTokenizer'; only Qwen2's byte-level BPE"):
            read_tokenizer(tmp_path)
    assert not (tmp_path / "CODE_RAN").exists()
    assert "tokenization_evil" not in sys.modules


@pytest.mark.parametrize(
    ("remove", "words"),
    [
        (("merges.txt",), "missing: tokenizer.json, merges.txt"),
        (("vocab.json", "merges.txt"), "missing: tokenizer.json, vocab.json, merges.txt"),
    ],
)
def test_missing_files_are_named(trained: Tokenizer, tmp_path: Path, remove: tuple[str, ...], words: str) -> None:
    write_tokenizer(tmp_path, trained, "vocab+merges")
    for name in remove:
        (tmp_path / name).unlink()
    with pytest.raises(ModelError, match=words):
        read_tokenizer(tmp_path)


def test_conflicting_and_malformed_files(trained: Tokenizer, tmp_path: Path) -> None:
    write_tokenizer(tmp_path, trained, "vocab+merges")
    (tmp_path / "added_tokens.json").write_text(json.dumps({IM_END: 5}))
    with pytest.raises(ModelError, match=r"gives '<\|im_end\|>' id 5, elsewhere it is 699"):
        read_tokenizer(tmp_path)
    (tmp_path / "added_tokens.json").write_text("{not json")
    with pytest.raises(ModelError, match="added_tokens.json is not valid JSON"):
        read_tokenizer(tmp_path)
    (tmp_path / "added_tokens.json").unlink()
    (tmp_path / "merges.txt").write_text("#version: 0.2\nzz qq\n")
    with pytest.raises(ModelError, match="are not readable"):
        read_tokenizer(tmp_path)


def test_special_tokens_map_alone_adds_tokens(trained: Tokenizer, tmp_path: Path) -> None:
    """Without tokenizer_config.json or added_tokens.json, special tokens take the next ids."""
    write_tokenizer(tmp_path, trained, "vocab+merges")
    for name in ("tokenizer_config.json", "added_tokens.json"):
        (tmp_path / name).unlink()
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": list(QWEN2_CHAT_TOKENS)}))
    built = read_tokenizer(tmp_path)
    assert [built.token_to_id(t) for t in QWEN2_CHAT_TOKENS] == [697, 698, 699]
    assert built.encode(f"a{IM_END}").ids[-1] == 699


def test_convert_names_the_missing_tokenizer_file(tmp_path: Path, capsys) -> None:
    folder, _ = next_folder(tmp_path)
    (folder / "merges.txt").unlink()
    cut3r, _ = write_cut3r_file(tmp_path)
    code, err = convert(capsys, "--llava", folder, "--cut3r", cut3r, "--out", tmp_path / "b", "--vision-heads", "2")
    assert_one_line_error(code, err, "has no tokenizer", "missing: tokenizer.json, merges.txt")
    assert not (tmp_path / "b").exists()
