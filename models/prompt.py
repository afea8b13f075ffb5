"""The LLM input layout: ChatML, the video block, LLaVA-Video's time text, situation tokens.

One question's sequence is::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    [c_1 v_1 ... v_1] ... [c_N v_N ... v_N] [e ...]      one block per frame, camera first;
                                                         video-end tokens (one_token layout)
    \\n{time instruction}\\n                                  end of the video prefix
    {situation}<Pos><Ori>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n

Everything up to the end of the time instruction depends only on the video, so its KV
cache is reused by every question. The chunks are tokenized separately, as LLaVA does
around ``<image>``; Qwen2's pre-tokenizer never merges a newline with what follows, so
chunking gives the ids a single pass would.

Control tokens (``<|im_start|>``, ``<|im_end|>``, ``<Pos>``, ``<Ori>``) are placed by id
between plain-text chunks, which the tokenizer reads as text only: the same ids a single
pass over the ChatML string gives (added tokens split it at the same places), and user
text (question, situation) can never become a control token, whatever it contains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loc3r.errors import InputError
from loc3r.models.tokenizer import TextTokenizer

SYSTEM_PROMPT = "You are a helpful assistant."


def time_instruction(duration_s: float, timestamps_s: Sequence[float]) -> str:
    """LLaVA-Video's sentence telling the LLM when the sampled frames were taken."""
    frame_times = ",".join(f"{t:.2f}s" for t in timestamps_s)
    return (
        f"The video lasts for {duration_s:.2f} seconds, and {len(timestamps_s)} frames are "
        f"uniformly sampled from it. These frames are located at {frame_times}."
        "Please answer the following questions related to this video."
    )


@dataclass(frozen=True)
class FrameSlots:
    """Absolute positions of one frame's tokens."""

    camera: int
    vision_start: int
    vision_end: int  # exclusive


@dataclass(frozen=True)
class VideoPrefix:
    """Token ids around the video block; the frame blocks themselves are embeddings."""

    head_ids: tuple[int, ...]
    num_frames: int
    tokens_per_frame: int  # camera token + vision tokens
    tail_ids: tuple[int, ...]
    end_tokens: int = 0  # embeddings after the last frame block (the video's newline)

    @property
    def video_start(self) -> int:
        return len(self.head_ids)

    @property
    def video_end(self) -> int:
        return self.video_start + self.num_frames * self.tokens_per_frame + self.end_tokens

    @property
    def length(self) -> int:
        return self.video_end + len(self.tail_ids)

    def frame_slots(self, frame: int) -> FrameSlots:
        start = self.video_start + frame * self.tokens_per_frame
        return FrameSlots(start, start + 1, start + self.tokens_per_frame)


@dataclass(frozen=True)
class QuestionSuffix:
    """Token ids after the video prefix, with the offsets of ``<Pos>`` and ``<Ori>``."""

    ids: tuple[int, ...]
    pos_offset: int
    ori_offset: int


@dataclass(frozen=True)
class PromptLayout:
    """Which absolute index holds which token in one question's full sequence."""

    prefix: VideoPrefix
    suffix: QuestionSuffix

    @property
    def length(self) -> int:
        return self.prefix.length + len(self.suffix.ids)

    @property
    def pos_index(self) -> int:
        return self.prefix.length + self.suffix.pos_offset

    @property
    def ori_index(self) -> int:
        return self.prefix.length + self.suffix.ori_offset

    @property
    def camera_indices(self) -> list[int]:
        return [self.prefix.frame_slots(t).camera for t in range(self.prefix.num_frames)]


def build_video_prefix(
    tokenizer: TextTokenizer,
    num_frames: int,
    vision_tokens_per_frame: int,
    duration_s: float,
    timestamps_s: Sequence[float],
    end_tokens: int = 0,
) -> VideoPrefix:
    """System turn, user header, the video block's geometry and the time instruction;
    ``end_tokens`` embeddings follow the last frame block (see ``vision.video_end_tokens``)."""
    if len(timestamps_s) != num_frames:
        raise ValueError(f"{len(timestamps_s)} timestamps for {num_frames} frames")
    t = tokenizer
    head = token_ids(t, t.im_start_id, f"system\n{SYSTEM_PROMPT}", t.im_end_id, "\n", t.im_start_id, "user\n")
    tail = f"\n{time_instruction(duration_s, timestamps_s)}\n"
    return VideoPrefix(
        head_ids=tuple(head),
        num_frames=num_frames,
        tokens_per_frame=1 + vision_tokens_per_frame,
        tail_ids=tuple(tokenizer.encode(tail)),
        end_tokens=end_tokens,
    )


NORMALIZER_SLACK = 2  # a normalizer (NFC) may shrink text before it is split into tokens


def check_text_fits(tokenizer: TextTokenizer, text: str, limit: int, what: str = "question") -> None:
    """Refuse, before tokenizing it, text that cannot fit ``limit`` tokens whatever its tokens:
    more bytes than ``limit`` of the vocabulary's longest tokens could spell (tokenizing
    megabytes takes minutes)."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limit * tokenizer.longest_token_bytes * NORMALIZER_SLACK:
        raise InputError(
            f"the {what} is {len(text)} characters long, more than the LLM's context of {limit} tokens can hold",
            f"ask a shorter {what}",
        )


def build_question_suffix(
    tokenizer: TextTokenizer, question: str, situation: str | None = None
) -> QuestionSuffix:
    """Situation text, ``<Pos><Ori>``, the question and the assistant header."""
    check_user_text(question, "question", allow_empty=False)
    located = build_situation_suffix(tokenizer, situation)
    question_ids = token_ids(tokenizer, f"\n{question}", tokenizer.im_end_id, "\n", tokenizer.im_start_id, "assistant\n")
    return QuestionSuffix((*located.ids, *question_ids), located.pos_offset, located.ori_offset)


def build_situation_suffix(tokenizer: TextTokenizer, situation: str | None = None) -> QuestionSuffix:
    """A question's suffix up to ``<Pos><Ori>``: all a pose needs (attention is causal, so
    their hidden states are those of any question that follows)."""
    situation_ids = tokenizer.encode(check_user_text(situation or "", "situation"))
    ids = (*situation_ids, tokenizer.pos_id, tokenizer.ori_id)
    return QuestionSuffix(ids, len(situation_ids), len(situation_ids) + 1)


def token_ids(tokenizer: TextTokenizer, *parts: str | int) -> list[int]:
    """Ids of ``parts`` in order: a ``str`` is tokenized as plain text, an ``int`` is a
    control token's id placed as it is."""
    ids: list[int] = []
    for part in parts:
        ids.extend([part] if isinstance(part, int) else tokenizer.encode(part))
    return ids


def check_user_text(text: str, what: str, allow_empty: bool = True) -> str:
    """Reject text the prompt cannot carry: empty questions, bad bytes. (Markup such as
    ``<|im_end|>`` is fine: it is read as the characters it is.)"""
    if not allow_empty and not text.strip():
        raise InputError(f"the {what} is empty", f"pass a non-empty {what}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the {what} is not valid UTF-8", f"re-encode the {what} as UTF-8") from None
    return text
