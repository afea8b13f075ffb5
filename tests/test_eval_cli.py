"""loc3r-eval: dataset checks, scoring, resuming, --compare, and one run of the tiny model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from loc3r.eval import cli as eval_cli
from loc3r.eval.dataset import load_dataset
from loc3r.runtime.result import ModelInfo, Pose

# -- the dataset ----------------------------------------------------------------------------


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


GOOD = {"video": "a.mp4", "question": "Where is the chair?"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"video": "a.mp4", "question": ', "not valid JSON (Expecting value at column 32): fix the item"),
        ("[1, 2]", "must be a JSON object, got list: fix the item"),
        ({**GOOD, "position": {"x": 1}}, "field 'position' must be {x, y} numbers: fix the item"),
        ({**GOOD, "position": {"x": "1", "y": 2}}, "field 'position' must be {x, y} numbers: fix the item"),
        ({**GOOD, "position": [1, 2]}, "field 'position' must be {x, y} numbers: fix the item"),
        ({**GOOD, "orientation": True}, "field 'orientation' must be a number (radians): fix the item"),
        ({"question": "Where?"}, "field 'video' must be a video file path: fix the item"),
        ({**GOOD, "video": "missing.mp4"}, "video 'missing.mp4' not found"),
        ({**GOOD, "question": " "}, "field 'question' must be non-empty text: fix the item"),
        ({**GOOD, "answer": {"text": "x"}}, "field 'answer' must be text, a list of accepted texts, or a number"),
        ({**GOOD, "options": ["chair"]}, "field 'options' must be a list of at least 2 texts"),
        ({**GOOD, "options": ["chair", "sofa"], "answer": "C"}, "field 'answer' must be one of the option letters A, B"),
        ({**GOOD, "postion": {"x": 1, "y": 2}}, "unknown field 'postion'"),
        ({**GOOD, "id": "q1"}, "id 'q1' is already used on line 1: give every item its own id"),
    ],
)
def test_malformed_line_is_reported_with_its_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: Any, message: str
) -> None:
    (tmp_path / "a.mp4").write_bytes(b"")  # loading the dataset only checks that videos exist
    data = write_lines(tmp_path / "DATA.jsonl", [{**GOOD, "id": "q1"}, "", bad])
    assert eval_cli.main([str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loc3r-eval: error: DATA.jsonl line 3: {message}")
    assert err.count("\n") == 1
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_dataset_fields(tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")
    data = write_lines(
        tmp_path / "data.jsonl",
        [
            "",
            {"video": "videos/a.mp4", "question": "What?", "answer": ["cup", "mug"], "position": {"x": 1, "y": -2.5}, "orientation": 3},
            "   ",
            {"id": 7, "video": str(tmp_path / "videos" / "a.mp4"), "question": "Which?", "options": ["chair", "sofa"], "answer": "sofa"},
            {"video": "videos/a.mp4", "question": "How many?", "answer": 4, "situation": "I sit.", "meta": {"scene": "s1"}},
            {"video": "videos/a.mp4", "question": "Pick", "options": {"A": "x", "B": "y"}},
        ],
    )
    first, second, third, fourth = load_dataset(data)
    assert (first.key, first.line, first.kind, first.answer) == ("line 2", 2, "open", ["cup", "mug"])
    assert first.video == (tmp_path / "videos" / "a.mp4").resolve() == second.video
    assert (first.position, first.orientation) == ((1.0, -2.5), 3.0)
    assert (second.key, second.kind, second.answer, second.options) == ("7", "choice", "B", {"A": "chair", "B": "sofa"})
    assert (third.kind, third.answer, third.situation, third.meta) == ("numeric", 4.0, "I sit.", {"scene": "s1"})
    assert fourth.kind is None


def test_the_documented_format_is_every_key_and_its_example_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` and the user guide list every key the loader reads, and the example file they
    show loads as written (relative paths from the file's folder)."""
    from loc3r.eval.dataset import EXAMPLE_LINES, FIELDS, KEYS

    assert set(KEYS) == set(FIELDS)
    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenes" / "kitchen.mp4").write_bytes(b"")
    (tmp_path / "hall.mp4").write_bytes(b"")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(EXAMPLE_LINES).replace("/data/hall.mp4", str(tmp_path / "hall.mp4")) + "\n")
    kitchen, chairs, exit_ = load_dataset(data)
    assert (kitchen.key, kitchen.kind, kitchen.position, kitchen.orientation) == ("q1", "open", (1.2, -0.4), 1.57)
    assert (chairs.kind, chairs.answer, exit_.kind, exit_.answer) == ("numeric", 4.0, "choice", "B")
    with pytest.raises(SystemExit):
        eval_cli.main(["--help"])
    shown = capsys.readouterr().out
    guide = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text()
    for key in KEYS:
        assert f"\n  {key} " in shown and f"| `{key}` |" in guide, key
    for line in EXAMPLE_LINES:
        assert f"  {line}\n" in shown and f"{line}\n" in guide


def test_empty_dataset_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_cli.main([str(write_lines(tmp_path / "empty.jsonl", ["", " "]))]) == 2
    assert "has no items" in capsys.readouterr().err
    assert eval_cli.main([str(tmp_path / "nope.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


# -- running, scoring, resuming (a scripted pipeline) ---------------------------------------


class ScriptedPipeline:
    """Answers from a script keyed by question; records every call."""

    def __init__(self, script: dict[str, tuple[str, Pose]]) -> None:
        self.script = script
        self.calls: list[tuple[str, str]] = []
        self.model_info = ModelInfo("scripted", "abc123", random_weights=True, localization="random", backend="torch")

    def ask(self, video: str, question: str, situation: Any = None, sampling: Any = None, num_frames: Any = None) -> Any:
        self.calls.append((Path(video).name, question))
        text, pose = self.script[question]
        return SimpleNamespace(text=text, pose=pose)


SCRIPT = {
    "What is on the table?": ("The cup.", Pose(0.3, 0.4, 0.2, 3.1)),  # 0.5 m off, 0.0416 rad off
    "Which seat?": ("B", Pose(2.0, 0.0, 0.9, 0.0)),  # 2 m off
    "How many chairs?": ("5 chairs", Pose(0.0, 1.0, 0.1, 0.0)),  # 1 m off
    "Where is the door?": ("on the left", Pose(0.0, 0.0, 0.5, 1.0)),  # 0 m off
}
ITEMS = [
    {"id": "cup", "video": "a.mp4", "question": "What is on the table?", "answer": "a cup", "position": {"x": 0, "y": 0}, "orientation": -3.1416},
    {"id": "seat", "video": "b.mp4", "question": "Which seat?", "options": ["sofa", "chair"], "answer": "B", "position": {"x": 0, "y": 0}},
    {"id": "chairs", "video": "a.mp4", "question": "How many chairs?", "answer": 4, "position": {"x": 0, "y": 0}},
    {"id": "door", "video": "b.mp4", "question": "Where is the door?", "answer": "left", "position": {"x": 0, "y": 0}, "orientation": 0.5},
]


@pytest.fixture
def scripted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ScriptedPipeline:
    pipeline = ScriptedPipeline(SCRIPT)
    monkeypatch.setattr(eval_cli, "load_pipeline", lambda model, backend: pipeline)
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"")
    write_lines(tmp_path / "data.jsonl", ITEMS)
    return pipeline


def run(tmp_path: Path, *extra: str) -> int:
    return eval_cli.main([str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out"), *extra])


def test_scores_by_hand(tmp_path: Path, scripted: ScriptedPipeline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path) == 0
    # each video's questions run back to back
    assert [q for _, q in scripted.calls] == ["What is on the table?", "How many chairs?", "Which seat?", "Where is the door?"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"position": 4, "orientation": 2, "open": 2, "choice": 1, "numeric": 1}
    got = summary["metrics"]
    expected = {
        "acc@0.5m": 0.5,  # errors 0.5 (inclusive), 1.0, 2.0, 0.0 in dataset order: 0.5 2 1 0
        "acc@1.0m": 0.75,
        "pos_err_mean_m": 0.875,
        "pos_err_median_m": 0.75,
        "acc@15deg": 0.5,  # 6.2832 - 6.2416 = 0.0416 rad = 2.38 deg; 0.5 rad = 28.6 deg
        "acc@30deg": 1.0,
        "em": 0.5,  # "The cup." = "a cup"; "on the left" != "left"
        "em_r": 1.0,  # ... but contains it
        "choice_acc": 1.0,
        "mra": 0.5,  # |5 - 4| / 4 = 0.25 < 1 - theta for theta 0.50 .. 0.70
        "sigma_auroc@1.0m": 1.0,  # the only > 1 m error has the highest sigma
        "acc@1.0m_keep50": 1.0,
        "acc@1.0m_keep80": 0.75,  # ceil(0.8 * 4) = 4 items
        "acc@1.0m_keep100": 0.75,
    }
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    # sigma 0.2 0.9 0.1 0.5 vs errors 0.5 2 1 0: ranks 2 4 1 3 vs 2 4 3 1 -> 1 - 6 * 8 / 60
    assert got["sigma_spearman"] == pytest.approx(0.2)
    assert got["ang_err_mean_deg"] == pytest.approx((2.3837 + 28.6479) / 2, abs=1e-3)
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "> **Warning:** model scripted has RANDOM weights" in markdown
    assert "| Acc@0.5m | 50.0% | 4 |" in markdown
    assert "| EM-R (refined) | 100.0% | 2 |" in markdown
    assert capsys.readouterr().out == markdown
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["cup", "chairs", "seat", "door"]
    assert json.loads(lines[0])["pose"] == {"x": 0.3, "y": 0.4, "sigma": 0.2, "theta_rad": 3.1}


def interrupt_after_first_line(out: Path) -> None:
    """The folder as a run killed while writing the second prediction leaves it: the marker
    records the first line (as after every line), half of the second line follows."""
    from loc3r import fileio

    first, second = (out / "predictions.jsonl").read_text().splitlines(keepends=True)[:2]
    (out / "predictions.jsonl").write_text(first + second[: len(second) // 2])
    marker = json.loads((out / fileio.OUTPUT_MARKER).read_text())
    marker["files"]["predictions.jsonl"] = {"size": len(first.encode()), "sha256": hashlib.sha256(first.encode()).hexdigest()}
    (out / fileio.OUTPUT_MARKER).write_text(json.dumps(marker))


def test_resume_after_interruption(tmp_path: Path, scripted: ScriptedPipeline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path) == 0
    out = tmp_path / "out"
    predictions, summary = (out / "predictions.jsonl").read_text(), (out / "summary.json").read_text()
    interrupt_after_first_line(out)
    (out / "summary.json").unlink()
    scripted.calls.clear()
    capsys.readouterr()
    assert run(tmp_path) == 0
    assert "bytes at the end of" in capsys.readouterr().err  # the half line is dropped, never truncated in place
    assert [q for _, q in scripted.calls] == ["How many chairs?", "Which seat?", "Where is the door?"]
    assert (out / "predictions.jsonl").read_text() == predictions
    assert (out / "summary.json").read_text() == summary
    scripted.calls.clear()
    assert run(tmp_path) == 0  # everything done: nothing asked, same summary
    assert scripted.calls == []
    assert (out / "summary.json").read_text() == summary


def test_limit_then_the_rest(tmp_path: Path, scripted: ScriptedPipeline) -> None:
    assert run(tmp_path, "--limit", "2") == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["items"] == 2
    assert len(scripted.calls) == 2
    assert run(tmp_path) == 0
    assert len(scripted.calls) == 4


def test_resume_refuses_other_settings(tmp_path: Path, scripted: ScriptedPipeline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "--frames", "2") == 0
    capsys.readouterr()
    assert run(tmp_path, "--frames", "4") == 2
    assert "holds predictions made with frames = 2, not 4: resume with the same settings" in capsys.readouterr().err


def test_resume_refuses_a_changed_dataset(tmp_path: Path, scripted: ScriptedPipeline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "--limit", "1") == 0
    write_lines(tmp_path / "data.jsonl", [{**ITEMS[0], "question": "What is under the table?"}])
    capsys.readouterr()
    assert run(tmp_path) == 2
    assert "line 1: item 'cup' is not in the dataset as it was" in capsys.readouterr().err


def test_a_corrupt_complete_line_is_an_error(tmp_path: Path, scripted: ScriptedPipeline, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path) == 0
    (tmp_path / "out" / "predictions.jsonl").write_text('{"key": "cup"\n')
    capsys.readouterr()
    assert run(tmp_path) == 2
    err = capsys.readouterr().err
    assert "holds predictions.jsonl, which changed since loc3r wrote it (it cannot be resumed)" in err


def test_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = {"dataset": "d", "items": 4, "metrics": {"acc@1.0m": 0.5, "pos_err_mean_m": 1.25, "em": None}}
    b = {"dataset": "d", "items": 4, "metrics": {"acc@1.0m": 0.75, "pos_err_mean_m": 1.0, "em": 0.5}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert eval_cli.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| metric | A | B | B - A |",
        "|---|---:|---:|---:|",
        "| Acc@1.0m | 50.0% | 75.0% | +25.0 pp |",
        "| position error, mean (m) | 1.250 | 1.000 | -0.250 |",
        "| EM | n/a | 50.0% | n/a |",
    ]
    (tmp_path / "c.json").write_text("[]")
    assert eval_cli.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 2
    assert "c.json is not a JSON object" in capsys.readouterr().err


def test_needs_a_dataset_or_compare(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([])
    assert exit_info.value.code == 2
    assert "pass a dataset DATA.jsonl, or --compare A.json B.json" in capsys.readouterr().err


# -- end to end on the tiny model -----------------------------------------------------------


def test_tiny_model_end_to_end_with_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loc3r.runtime import pipeline as pipeline_module
    from loc3r.runtime.demo_video import write_demo_video

    write_demo_video(tmp_path / "a.mp4", num_frames=4, width=64, height=48)
    write_demo_video(tmp_path / "b.mp4", num_frames=3, width=48, height=32)
    # a.mp4 gets one question, b.mp4 three: the resumed run (from item 2) encodes b.mp4 only
    write_lines(tmp_path / "data.jsonl", [{**item, "video": "b.mp4"} if item["id"] == "chairs" else item for item in ITEMS])
    asked: list[str] = []
    real_ask = pipeline_module.Pipeline.ask

    def counting_ask(self: Any, video: Any, question: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(question)
        return real_ask(self, video, question, *args, **kwargs)

    monkeypatch.setattr(pipeline_module.Pipeline, "ask", counting_ask)
    options = ["--model", "tiny", "--frames", "2", "--max-new-tokens", "4"]
    assert run(tmp_path, *options) == 0
    out = tmp_path / "out"
    predictions, summary = (out / "predictions.jsonl").read_text(), (out / "summary.json").read_text()
    assert asked == ["What is on the table?", "Which seat?", "How many chairs?", "Where is the door?"]
    assert json.loads(summary)["counts"]["position"] == 4
    assert "RANDOM weights" in (out / "summary.md").read_text()

    interrupt_after_first_line(out)
    asked.clear()
    assert run(tmp_path, *options) == 0
    assert asked == ["Which seat?", "How many chairs?", "Where is the door?"]  # "cup" is not redone
    assert (out / "predictions.jsonl").read_text() == predictions
    assert fixed_part(out / "summary.json") == fixed_part(summary)


def fixed_part(summary: Path | str) -> dict[str, Any]:
    """A summary without the precision's reason, which quotes the memory available when the
    model was loaded (it differs between a run and its resumption on a shared machine)."""
    doc = json.loads(summary.read_text() if isinstance(summary, Path) else summary)
    assert doc["model"].pop("dtype_reason")
    return doc
