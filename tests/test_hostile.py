"""Hostile files and faults (issue 13): no checkpoint runs code, no user file is destroyed,
every artifact is verified, user text never becomes a control token, and every fault is one
line with the right exit code. docs/robustness.md lists the same cases.

The CLIs run in-process on the tiny model (helpers from test_bad_input); the cases that need
a real process (a prompt on stdin, signals, a closed pipe) run the console scripts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bad_input import FAST, assert_error, export, ok_json, run
from test_convert import cut3r_file, next_folder, tokenizer_without_loc3r_tokens  # noqa: F401 - cut3r_file is a fixture
from tokenizers import AddedToken

from loc3r.models.convert_tokenizer import loc3r_tokenizer
from loc3r.models.prompt import build_question_suffix
from loc3r.models.tiny import ensure_tiny_bundle
from loc3r.models.tokenizer import TextTokenizer
from loc3r.runtime import session as session_module
from loc3r.runtime.demo_video import write_demo_video

SCRIPTS = Path(sys.executable).parent


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("media") / "demo.mp4", num_frames=8, width=64, height=48)


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return ensure_tiny_bundle()


def script(name: str, *argv: object, stdin: str = "", timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """A console script in its own process."""
    return subprocess.run([str(SCRIPTS / name), *map(str, argv)], input=stdin, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


# --- 1. no checkpoint runs code -----------------------------------------------------------


def _remote_code_checkpoint(root: Path) -> tuple[Path, Path]:
    """A LLaVA folder whose tokenizer is vocab.json + merges.txt and a tokenizer_config.json
    whose ``auto_map`` names ``tokenization_evil.py``, which leaves a file behind if it runs."""
    folder, _ = next_folder(root)
    data = json.loads(tokenizer_without_loc3r_tokens().to_str())
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {str(t["id"]): {**t, "special": True} for t in data["added_tokens"]}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
        "added_tokens_decoder": added,
    }))
    ran = root / "THE_CHECKPOINT_RAN_CODE"
    (folder / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    return folder, ran


def test_a_checkpoint_with_tokenizer_code_never_runs_it(tmp_path: Path, cut3r_file) -> None:  # noqa: F811
    """``auto_map`` + ``tokenization_*.py``: answering y to any prompt runs nothing; the tokenizer
    is built from the data files (or refused in one line), and nothing is asked."""
    folder, ran = _remote_code_checkpoint(tmp_path)
    out = tmp_path / "bundle"
    result = script("loc3r-convert", "--llava", folder, "--cut3r", cut3r_file[0], "--out", out, "--vision-heads", "2",
                    stdin="y\ny\n")
    assert not ran.exists(), "the checkpoint's tokenizer code ran"
    assert "[y/N]" not in result.stdout + result.stderr and "custom code" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if result.returncode == 0:
        tokenizer = TextTokenizer.from_dir(out)
        assert tokenizer.encode("where am I") == loc3r_tokenizer(folder, 320).encode("where am I")
    else:
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_no_source_file_asks_to_trust_remote_code() -> None:
    root = Path(__file__).resolve().parents[1]
    sources = [p for folder in ("loc3r", "models", "export", "runtime", "benchmarks", "engines") for p in (root / folder).rglob("*.py")]
    assert sources
    assert not [p for p in sources if "trust_remote_code" in p.read_text(encoding="utf-8")]


class Payload:
    """A class a pickle can name: torch's weights_only loader refuses to build it."""


@pytest.mark.parametrize("where", ["heads", "shard"])
def test_pickled_objects_are_refused_in_one_line(where: str, tmp_path: Path, capsys, cut3r_file) -> None:  # noqa: F811
    """torch's weights_only error (which advises ``weights_only=False``) becomes one line, exit 2."""
    import torch

    from loc3r.models.convert_cli import main as convert_main

    folder, state = next_folder(tmp_path, fmt="bin")
    extra = []
    if where == "heads":
        torch.save({"f_pos.0.weight": torch.zeros(2, 2), "payload": Payload()}, tmp_path / "heads.pth")
        extra = ["--loc3r-heads", tmp_path / "heads.pth"]
    else:
        shard = sorted(folder.glob("pytorch_model-*.bin"))[0]
        torch.save({**torch.load(shard, weights_only=True), "payload": Payload()}, shard)
    code = convert_main([str(a) for a in ("--llava", folder, "--cut3r", cut3r_file[0], "--out", tmp_path / "b",
                                          "--vision-heads", "2", *extra)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "holds Python objects besides tensors, which loc3r never loads" in lines[0]
    assert "weights_only" not in err and not (tmp_path / "b").exists()


# --- 4. user text never becomes a control token -----------------------------------------------

QWEN2_ADDED = [  # Qwen2.5's added tokens after <|endoftext|>, <|im_start|>, <|im_end|>: (content, special)
    *[(t, True) for t in ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                          "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")],
    *[(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")],
]


@pytest.fixture(scope="module")
def qwen2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    """A Qwen2-style tokenizer with every Qwen2.5 added token (special and not), converted as
    loc3r-convert does (which adds <Pos> and <Ori>)."""
    tokenizer = tokenizer_without_loc3r_tokens()
    for content, special in QWEN2_ADDED:
        token = AddedToken(content, special=special, normalized=False)
        tokenizer.add_special_tokens([token]) if special else tokenizer.add_tokens([token])
    folder = tmp_path_factory.mktemp("qwen2")
    tokenizer.save(str(folder / "tokenizer.json"))
    return loc3r_tokenizer(folder, 400)


def added_tokens(tokenizer: TextTokenizer) -> list[str]:
    return sorted(tokenizer.id_to_token(i) for i in tokenizer.control_ids)


def test_every_added_token_of_a_converted_qwen2_tokenizer_is_plain_text_in_user_text(qwen2_tokenizer: TextTokenizer) -> None:
    tokens = added_tokens(qwen2_tokenizer)
    assert len(tokens) == 3 + len(QWEN2_ADDED) + 2 and "<|video_pad|>" in tokens and "<Pos>" in tokens
    t = qwen2_tokenizer
    for token in tokens:
        question, situation = f"Where am I?{token}", f"{token} I stand{token}"
        suffix = build_question_suffix(t, question, situation)
        control = [i for i in suffix.ids if i in t.control_ids]
        assert control == [t.pos_id, t.ori_id, t.im_end_id, t.im_start_id], token  # only the ones we place
        assert t.decode(suffix.ids[: suffix.pos_offset]) == situation
        assert t.decode(t.encode(question)) == question


_FRAGMENTS = st.sampled_from(["<", ">", "|", "<|", "|>", "im_end", "endoftext", "Pos", "Ori", "video_pad", " ", "\n", "é", "Where"])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_no_text_encodes_to_a_control_token(qwen2_tokenizer: TextTokenizer, data: st.DataObject) -> None:
    pieces = data.draw(st.lists(st.one_of(st.sampled_from(added_tokens(qwen2_tokenizer)), _FRAGMENTS, st.text(max_size=4)), max_size=12))
    text = "".join(pieces).encode("utf-8", "replace").decode("utf-8")
    ids = qwen2_tokenizer.encode(text)
    assert not qwen2_tokenizer.control_ids.intersection(ids)
    assert qwen2_tokenizer.decode(ids) == text


def test_markup_in_a_question_reaches_the_model_as_text(video: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    suffixes = []

    def spy(tokenizer, question, situation=None):  # noqa: ANN001, ANN202
        suffixes.append((tokenizer, build_question_suffix(tokenizer, question, situation)))
        return suffixes[-1][1]

    monkeypatch.setattr(session_module, "build_question_suffix", spy)
    out = ok_json(run(capsys, video, "Where am I?<|endoftext|><|im_end|>", "--situation", "<Pos><Ori> <|im_start|>", "--json", *FAST))
    assert out["question"] == "Where am I?<|endoftext|><|im_end|>"
    tokenizer, suffix = suffixes[0]
    assert [i for i in suffix.ids if i in tokenizer.control_ids] == [tokenizer.pos_id, tokenizer.ori_id, tokenizer.im_end_id, tokenizer.im_start_id]
