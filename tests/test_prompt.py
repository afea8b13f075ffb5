"""Exact token layout of the LLM input: frame blocks, time text, <Pos>/<Ori>."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizers import Tokenizer

from loc3r.errors import InputError
from loc3r.models.prompt import (
    SYSTEM_PROMPT,
    PromptLayout,
    build_question_suffix,
    build_video_prefix,
    time_instruction,
)
from loc3r.models.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def markup_tokenizer(tiny_tokenizer: TextTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The same tokenizer read with its added tokens matched in text (the reference's way)."""
    folder = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save(folder)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_time_instruction_matches_llava_video() -> None:
    text = time_instruction(12.0, [0.0, 0.5, 11.25])
    assert text == (
        "The video lasts for 12.00 seconds, and 3 frames are uniformly sampled from it. "
        "These frames are located at 0.00s,0.50s,11.25s."
        "Please answer the following questions related to this video."
    )


@pytest.mark.parametrize("vision_tokens, expected_block", [(210, 211), (182, 183)])
def test_video_block_geometry(tiny_tokenizer: TextTokenizer, vision_tokens: int, expected_block: int) -> None:
    times = list(np.linspace(0, 9.9, 32))
    prefix = build_video_prefix(tiny_tokenizer, 32, vision_tokens, 10.0, times)
    assert prefix.tokens_per_frame == expected_block
    assert prefix.video_end - prefix.video_start == 32 * expected_block
    head = tiny_tokenizer.decode(prefix.head_ids)
    assert head == "system\nYou are a helpful assistant.\nuser\n"  # specials skipped on decode
    assert prefix.head_ids[0] == tiny_tokenizer.im_start_id
    slots = prefix.frame_slots(5)
    assert slots.camera == prefix.video_start + 5 * expected_block
    assert (slots.vision_start, slots.vision_end) == (slots.camera + 1, slots.camera + expected_block)
    assert tiny_tokenizer.decode(prefix.tail_ids).startswith("\nThe video lasts for 10.00 seconds, and 32 frames")
    assert prefix.length == len(prefix.head_ids) + 32 * expected_block + len(prefix.tail_ids)


def full_ids(layout: PromptLayout, placeholder: int = -1) -> list[int]:
    p = layout.prefix
    return [*p.head_ids, *[placeholder] * (p.video_end - p.video_start), *p.tail_ids, *layout.suffix.ids]


@pytest.mark.parametrize("situation", ["", "I am sitting on the bed facing the window."])
def test_pos_ori_sit_between_situation_and_question(tiny_tokenizer: TextTokenizer, situation: str) -> None:
    prefix = build_video_prefix(tiny_tokenizer, 4, 210, 4.0, [0.0, 1.0, 2.0, 3.0])
    suffix = build_question_suffix(tiny_tokenizer, "Where am I?", situation)
    layout = PromptLayout(prefix, suffix)
    ids = full_ids(layout)
    assert len(ids) == layout.length
    assert ids[layout.pos_index] == tiny_tokenizer.pos_id
    assert ids[layout.ori_index] == tiny_tokenizer.ori_id
    assert layout.ori_index == layout.pos_index + 1
    assert tiny_tokenizer.decode(ids[prefix.length : layout.pos_index]) == situation
    assert ids.count(tiny_tokenizer.pos_id) == 1 and ids.count(tiny_tokenizer.ori_id) == 1
    # the question follows, then the end of the user turn and the assistant header
    tail = tiny_tokenizer.decode(ids[layout.ori_index + 1 :])
    assert tail == "\nWhere am I?\nassistant\n"
    assistant_header = [tiny_tokenizer.im_end_id, *tiny_tokenizer.encode("\n"), tiny_tokenizer.im_start_id,
                        *tiny_tokenizer.encode("assistant\n")]
    assert ids[-len(assistant_header) :] == assistant_header
    assert layout.camera_indices == [prefix.video_start + t * 211 for t in range(4)]
    assert all(ids[i] == -1 for i in layout.camera_indices)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s.strip()))
def test_chunked_tokenization_equals_whole(tiny_tokenizer: TextTokenizer, question: str) -> None:
    """Tokenizing the question separately from the time text changes no ids."""
    tail = "\nThe video lasts for 1.00 seconds.\n"
    assert tiny_tokenizer.encode(tail) + tiny_tokenizer.encode(f"\n{question}") == tiny_tokenizer.encode(f"{tail}\n{question}")


@pytest.mark.parametrize("situation", ["", "I am sitting on the bed."])
def test_prompt_ids_equal_one_pass_over_the_chatml_text(
    tiny_tokenizer: TextTokenizer, markup_tokenizer: Tokenizer, situation: str
) -> None:
    """Control tokens placed by id give exactly the ids of the whole ChatML string read with
    its added tokens matched (as LLaVA-Video tokenizes its prompt), for ordinary text."""
    stamps = [0.0, 1.5, 3.0]
    prefix = build_video_prefix(tiny_tokenizer, 3, 4, 4.5, stamps)
    suffix = build_question_suffix(tiny_tokenizer, "Where is the chair?", situation)
    reference = lambda text: markup_tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    assert list(prefix.head_ids) == reference(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert list(prefix.tail_ids) == reference(f"\n{time_instruction(4.5, stamps)}\n")
    assert list(suffix.ids) == reference(f"{situation}<Pos><Ori>\nWhere is the chair?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "question, message",
    [
        ("", "the question is empty"),
        ("   \n", "the question is empty"),
        ("a \udcff b", "the question is not valid UTF-8"),
    ],
)
def test_bad_questions_are_input_errors(tiny_tokenizer: TextTokenizer, question: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_question_suffix(tiny_tokenizer, question)


def test_config_activations_are_transformers_activations() -> None:
    """The activation names a config may hold (listed so that reading a config needs no
    transformers) are all still activations transformers maps."""
    from transformers.activations import ACT2FN

    from loc3r.models.config import ACTIVATIONS

    assert ACTIVATIONS <= set(ACT2FN), sorted(ACTIVATIONS - set(ACT2FN))
