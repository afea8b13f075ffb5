"""loc3r-eval's dataset: a JSONL file, one question about a video per line, checked line by line.

Fields: ``video`` (path; relative paths start at the JSONL file's folder), ``question``,
optional ``situation``, ``answer`` (text, list of accepted texts, a number, or with ``options``
a choice letter or an option's text), ``options`` (list -> letters A, B, ... or {letter: text}),
``position`` {x, y} (metres, BEV frame), ``orientation`` (radians), ``id`` (string or integer,
unique), ``meta`` (anything; carried into the predictions). Blank lines are ignored.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loc3r.errors import InputError
from loc3r.fileio import check_readable_file

FIELDS = ("id", "video", "question", "situation", "answer", "options", "position", "orientation", "meta")
# every key of a line, what it holds (``loc3r-eval --help`` and docs/user-guide.md show these)
KEYS: dict[str, str] = {
    "video": "required: the video file (a relative path starts at the JSONL file's folder)",
    "question": "required: the question (non-empty text)",
    "situation": "optional: the situation text, placed before <Pos><Ori>",
    "answer": "optional: the reference answer: a text, a list of accepted texts, a number (scored by MRA), "
    "or with options a letter or an option's exact text",
    "options": "optional: multiple choice: a list of 2+ texts (letters A, B, ... in order) or {letter: text}",
    "position": "optional: the true position {x, y} in metres (BEV frame): localization metrics",
    "orientation": "optional: the true heading in radians: orientation metrics",
    "id": "optional: a unique string or integer (default: line N)",
    "meta": "optional: anything; copied into the predictions",
}
EXAMPLE_LINES = (
    '{"id": "q1", "video": "scenes/kitchen.mp4", "situation": "I am facing the window.", "question": "What is on my left?", '
    '"answer": ["a fridge", "fridge"], "position": {"x": 1.2, "y": -0.4}, "orientation": 1.57}',
    '{"id": "q2", "video": "scenes/kitchen.mp4", "question": "How many chairs are there?", "answer": 4}',
    '{"id": "q3", "video": "/data/hall.mp4", "question": "Which way is the exit?", "options": ["left", "right", "behind me"], '
    '"answer": "B", "meta": {"split": "val"}}',
)


def format_help() -> str:
    """The dataset format as ``--help`` shows it: every key, then an example file."""
    width = max(map(len, KEYS))
    keys = "\n".join(f"  {key:<{width}}  {text}" for key, text in KEYS.items())
    example = "\n".join(f"  {line}" for line in EXAMPLE_LINES)
    return f"dataset format: one JSON object per line (blank lines ignored), keys:\n{keys}\n\nexample DATA.jsonl:\n{example}"
_FIX = "fix the item"
Fail = Callable[[str, str], InputError]  # (field, what it must be) -> the error to raise


@dataclass(frozen=True)
class Item:
    """One question with its ground truth; ``key`` is the id, or ``line N`` without one."""

    key: str
    line: int
    video: Path  # absolute
    video_field: str  # as written in the file
    question: str
    situation: str | None = None
    answer: str | list[str] | float | None = None  # a choice letter when ``options`` is set
    options: dict[str, str] | None = None
    position: tuple[float, float] | None = None
    orientation: float | None = None
    meta: Any = None

    @property
    def kind(self) -> str | None:
        """How the answer is scored: ``choice``, ``numeric``, ``open``, or None without one."""
        if self.answer is None:
            return None
        if self.options is not None:
            return "choice"
        return "numeric" if isinstance(self.answer, float) else "open"


def load_dataset(path: str | Path, limit: int | None = None) -> list[Item]:
    """Read and check the lines of a JSONL dataset, streamed: with ``limit``, reading stops
    after that many items (a huge file is not parsed past them). The first bad line raises
    ``InputError``."""
    path = Path(path)
    check_readable_file(path, "dataset")
    items: list[Item] = []
    keys: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8", newline="\n") as stream:
            for number, line in enumerate(stream, start=1):
                if limit is not None and len(items) >= limit:
                    break
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                item = parse_item(line, number, path.parent, path.name)
                if item.key in keys:
                    raise InputError(f"{path.name} line {number}: id {item.key!r} is already used on line {keys[item.key]}", "give every item its own id")
                keys[item.key] = number
                items.append(item)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read dataset {path} ({exc})", "pass a UTF-8 JSONL file") from None
    if not items:
        raise InputError(f"dataset {path} has no items", "write one JSON object per line")
    return items


def parse_item(line: str, number: int, folder: Path, name: str = "dataset") -> Item:
    """One JSONL line as an ``Item``; ``folder`` anchors relative video paths."""
    where = f"{name} line {number}"
    raw = parse_json_line(line, where)
    if not isinstance(raw, dict):
        raise InputError(f"{where}: must be a JSON object, got {type(raw).__name__}", _FIX)
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InputError(
            f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})",
            "fix the name, or put extra data under 'meta'",
        )

    def fail(field: str, must: str) -> InputError:
        return InputError(f"{where}: field {field!r} must be {must}", _FIX)

    video_field = raw.get("video")
    if not isinstance(video_field, str) or not video_field.strip() or "\x00" in video_field:
        raise fail("video", "a video file path")
    video = (folder / video_field).resolve()
    if video.exists() and not video.is_file():
        raise InputError(f"{where}: video {video_field!r} is not a regular file (a folder, FIFO or device: {video})", "name a video file")
    if not video.is_file():
        raise InputError(f"{where}: video {video_field!r} not found (looked at {video})", "fix the path; relative paths start at the dataset's folder")
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise fail("question", "non-empty text")
    situation = raw.get("situation")
    if situation is not None and not isinstance(situation, str):
        raise fail("situation", "text")
    item_id = raw.get("id")
    if item_id is not None and (isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or item_id == ""):
        raise fail("id", "a string or an integer")
    options = _options(raw.get("options"), fail)
    return Item(
        key=str(item_id) if item_id is not None else f"line {number}",
        line=number,
        video=video,
        video_field=video_field,
        question=question,
        situation=situation,
        answer=_answer(raw.get("answer"), options, fail),
        options=options,
        position=_position(raw.get("position"), fail),
        orientation=_orientation(raw.get("orientation"), fail),
        meta=raw.get("meta"),
    )


def parse_json_line(line: str, where: str) -> Any:
    """One JSON value, which must be valid Unicode text throughout (no lone surrogates:
    they could not be written back as UTF-8) and not absurdly deep."""
    try:
        value = json.loads(line)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})", _FIX) from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply", _FIX) from None
    except UnicodeEncodeError as exc:
        raise InputError(f"{where}: holds a lone surrogate ({exc.object[exc.start:exc.end]!r}), which is not text", _FIX) from None
    return value


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool; not an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _options(value: Any, fail: Fail) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, list) and 2 <= len(value) <= 26 and all(isinstance(v, str) for v in value):
        return dict(zip(string.ascii_uppercase, value))
    if (
        isinstance(value, dict)
        and len(value) >= 2
        and all(k in string.ascii_uppercase and len(k) == 1 for k in value)
        and all(isinstance(v, str) for v in value.values())
    ):
        return dict(value)
    raise fail("options", "a list of at least 2 texts or {letter: text} with capital letters")


def _answer(value: Any, options: dict[str, str] | None, fail: Fail) -> str | list[str] | float | None:
    if value is None:
        return None
    if options is not None:
        if isinstance(value, str) and value.strip() in options:
            return value.strip()
        matches = [letter for letter, text in options.items() if isinstance(value, str) and text == value]
        if len(matches) == 1:
            return matches[0]
        raise fail("answer", f"one of the option letters {', '.join(options)} (or an option's exact text)")
    if is_number(value):
        return float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise fail("answer", "text, a list of accepted texts, or a number")


def _position(value: Any, fail: Fail) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not is_number(value.get("x")) or not is_number(value.get("y")):
        raise fail("position", "{x, y} numbers")
    return float(value["x"]), float(value["y"])


def _orientation(value: Any, fail: Fail) -> float | None:
    if value is None:
        return None
    if not is_number(value):
        raise fail("orientation", "a number (radians)")
    return float(value)
