"""Issue 23, class 4: every output folder under one rule, and the rule cannot be forged.

A folder is replaced only when every file in it is one loc3r wrote, as its marker records
with size and SHA-256; a user's file (whatever its name), a file changed since, a copied or
forged marker, and a symlinked --out are refused, and nothing in the folder is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_bad_input import FAST, run
from test_eval_cli import ITEMS, ScriptedPipeline, scripted, write_lines  # noqa: F401 - scripted is a fixture
from test_eval_cli import run as eval_run
from test_hostile import _tree, cli, export

from loc3r import fileio
from loc3r.models.tiny import ensure_tiny_bundle


def marked(folder: Path, kind: str = "bundle", **files: str) -> Path:
    """A folder as loc3r writes it: ``files`` (name -> text) and the output marker."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"config.json": "{}"}).items():
        (folder / name).write_text(text)
    fileio.write_marker(folder, kind)
    return folder


def _users_loc3r_named_file(out: Path) -> str:
    marked(out)
    (out / ".loc3r-my-notes.txt").write_text("mine")
    return "holds .loc3r-my-notes.txt, which loc3r did not write"


def _forged_marker_listing_notes(out: Path) -> str:
    marked(out)
    (out / "notes.md").write_text("my notes")
    marker = json.loads((out / fileio.OUTPUT_MARKER).read_text())
    marker["files"]["notes.md"] = {"size": 8, "sha256": "0" * 64}
    (out / fileio.OUTPUT_MARKER).write_text(json.dumps(marker))
    return "holds notes.md, which changed since loc3r wrote it"


def _marker_copied_from_elsewhere(out: Path) -> str:
    other = marked(out.parent / "other", **{"config.json": "{}", "notes.md": "theirs"})
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.md").write_text("my own notes")
    shutil.copy(other / fileio.OUTPUT_MARKER, out / fileio.OUTPUT_MARKER)
    return "holds notes.md, which changed since loc3r wrote it"


def _our_file_edited(out: Path) -> str:
    marked(out, **{"config.json": "{}", "model.safetensors": "weights"})
    (out / "model.safetensors").write_text("my edits")
    return "holds model.safetensors, which changed since loc3r wrote it"


def _user_folder_inside(out: Path) -> str:
    marked(out)
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("mine")
    return "holds sub/x.txt, which loc3r did not write"


def _symlink_inside(out: Path) -> str:
    marked(out)
    (out / "link").symlink_to(out.parent)
    return "holds link, which loc3r did not write"


def _old_marker(out: Path) -> str:
    out.mkdir()
    (out / "notes.md").write_text("mine")
    marker = {"format": fileio.MARKER_FORMAT, "version": 1, "kind": "bundle", "entries": ["notes.md"]}
    (out / fileio.OUTPUT_MARKER).write_text(json.dumps(marker))
    return "is a folder loc3r did not write"


def _symlinked_out(out: Path) -> str:
    real = marked(out.parent / "real")
    out.symlink_to(real)
    return "is a symbolic link; loc3r does not write through links"


FOREIGN: dict[str, Callable[[Path], str]] = {
    "a user's .loc3r-* file": _users_loc3r_named_file,
    "a forged marker listing the user's file": _forged_marker_listing_notes,
    "a marker copied from another folder": _marker_copied_from_elsewhere,
    "a file loc3r wrote, edited since": _our_file_edited,
    "a user's folder inside": _user_folder_inside,
    "a symlink inside": _symlink_inside,
    "a marker of the old format": _old_marker,
    "a symlinked --out": _symlinked_out,
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_atomic_directory_never_replaces_a_folder_holding_foreign_files(case: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fragment = FOREIGN[case](out)
    before = _tree(tmp_path)
    with pytest.raises(fileio.InputError, match=fragment.replace(".", r"\.")):
        with fileio.atomic_directory(out, "bundle") as staging:
            (staging / "config.json").write_text("new")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("case", ["a user's .loc3r-* file", "a forged marker listing the user's file", "a symlinked --out"])
@pytest.mark.parametrize("prog", ["loc3r-convert", "loc3r-export"])
def test_the_clis_refuse_foreign_output_folders_touching_nothing(prog: str, case: str, tmp_path: Path, capsys) -> None:
    from loc3r.models import convert_cli

    out = tmp_path / "out"
    kind = "bundle" if prog == "loc3r-convert" else "export"
    fragment = FOREIGN[case](out)
    if kind == "export":  # the same files, marked as an export
        target = out.resolve()
        marker = json.loads((target / fileio.OUTPUT_MARKER).read_text())
        (target / fileio.OUTPUT_MARKER).write_text(json.dumps({**marker, "kind": "export"}))
    before = _tree(tmp_path)
    if prog == "loc3r-export":
        result = export(capsys, "--target", "cpu", "--llm", "none", "--out", out)
    else:
        result = cli(convert_cli.main, capsys, "--llava", tmp_path / "nowhere", "--cut3r", tmp_path / "c.pth", "--out", out)
    assert result.code == 2 and fragment in result.err and "Traceback" not in result.err, result.err
    assert _tree(tmp_path) == before


def test_a_folder_loc3r_wrote_is_replaced_keeping_declared_caches(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with fileio.atomic_directory(out, "export", later=("timing.cache",)) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "a.onnx").write_text("first")
    (out / "timing.cache").write_text("added by TensorRT")
    (out / "engine.plan").write_text("built")
    fileio.claim_entries(out, ["engine.plan"])
    with fileio.atomic_directory(out, "export", later=("timing.cache",)) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "a.onnx").write_text("second")
    assert (out / "sub" / "a.onnx").read_text() == "second" and not (out / "engine.plan").exists()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_bundle_left_aside_by_a_killed_run_is_restored_by_the_next_run(tmp_path: Path, capsys) -> None:
    """Killed between the two renames: only ``.B.loc3r-PID-*.old`` holds the data; the next
    ``loc3r-run --model B`` puts it back, says so, and answers."""
    video = tmp_path / "v.mp4"
    from loc3r.runtime.demo_video import write_demo_video

    write_demo_video(video, num_frames=4, width=64, height=48)
    bundle = tmp_path / "B"
    with fileio.atomic_directory(bundle, "bundle") as staging:
        for item in ensure_tiny_bundle().iterdir():
            if item.name != fileio.OUTPUT_MARKER:
                shutil.copy(item, staging / item.name)
    aside = tmp_path / f".B.loc3r-{_dead_pid()}-abc.old"
    bundle.rename(aside)  # the moment of the kill
    result = run(capsys, video, "Where am I?", "--model", bundle, "--json", *FAST)
    assert result.code == 0, result.err
    assert f"restored {bundle} from {aside.name}" in result.err
    assert (bundle / "config.json").is_file() and not aside.exists()


# -- loc3r-eval --out ------------------------------------------------------------------------

def _users_summary_in_a_fresh_folder(out: Path) -> str:
    out.mkdir()
    (out / "summary.md").write_text("my summary")
    return "is a folder loc3r did not write (it holds summary.md)"


def _users_summary_after_a_run(out: Path) -> str:
    (out / "summary.md").write_text("my own notes now")
    return "holds summary.md, which changed since loc3r wrote it; it would be overwritten"


def _users_file_beside(out: Path) -> str:
    (out / ".loc3r-my-notes.txt").write_text("mine")
    return "holds .loc3r-my-notes.txt, which loc3r did not write"


def _forged_line_inside(out: Path) -> str:
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    forged = json.loads(lines[0])
    forged["pose"]["x"] = 0.0
    (out / "predictions.jsonl").write_text(json.dumps(forged) + "\n" + "".join(lines[1:]))
    return "holds predictions.jsonl, which changed since loc3r wrote it (it cannot be resumed)"


def _no_final_newline(out: Path) -> str:
    data = (out / "predictions.jsonl").read_bytes()
    (out / "predictions.jsonl").write_bytes(data[:-1])
    return "holds predictions.jsonl, which changed since loc3r wrote it"


def _symlinked_eval_out(out: Path) -> str:
    shutil.move(out, out.parent / "real")
    out.symlink_to(out.parent / "real")
    return "is a symbolic link; loc3r does not write through links"


def _symlinked_to_a_system_folder(out: Path) -> str:
    shutil.rmtree(out)
    (out.parent / "etc").mkdir()
    out.symlink_to(out.parent / "etc")
    return "is a symbolic link; loc3r does not write through links"


EVAL_FOREIGN: dict[str, tuple[bool, Callable[[Path], str]]] = {  # case -> (after a first run?, make it)
    "the user's summary.md, no marker": (False, _users_summary_in_a_fresh_folder),
    "summary.md replaced by the user": (True, _users_summary_after_a_run),
    "a user's .loc3r-* file": (True, _users_file_beside),
    "a forged prediction line": (True, _forged_line_inside),
    "predictions without a final newline": (True, _no_final_newline),
    "--out a symlink to an eval folder": (True, _symlinked_eval_out),
    "--out a symlink to another folder": (True, _symlinked_to_a_system_folder),
}


@pytest.mark.parametrize("case", list(EVAL_FOREIGN))
def test_eval_out_refuses_foreign_forged_and_linked_contents(case: str, tmp_path: Path, scripted: ScriptedPipeline, capsys) -> None:
    after_run, make = EVAL_FOREIGN[case]
    out = tmp_path / "out"
    if after_run:
        assert eval_run(tmp_path) == 0
    fragment = make(out)
    before = _tree(tmp_path)
    capsys.readouterr()
    scripted.calls.clear()
    assert eval_run(tmp_path) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert _tree(tmp_path) == before and scripted.calls == []  # nothing written, nothing asked


def test_a_line_appended_beyond_the_record_is_dropped_not_scored(tmp_path: Path, scripted: ScriptedPipeline, capsys) -> None:
    """A line no run recorded (appended by hand, or half-written when a run was killed) is
    written away, and its item answered again."""
    assert eval_run(tmp_path, "--limit", "1") == 0
    first = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    forged = {**first, "key": "seat", "question": "Which seat?", "video": "b.mp4", "answer": "B"}
    with (tmp_path / "out" / "predictions.jsonl").open("a") as stream:
        stream.write(json.dumps(forged) + "\n")
    scripted.calls.clear()
    capsys.readouterr()
    assert eval_run(tmp_path) == 0
    assert "dropped" in capsys.readouterr().err
    assert ("b.mp4", "Which seat?") in scripted.calls


def test_eval_limit_reads_a_huge_dataset_lazily(tmp_path: Path, scripted: ScriptedPipeline) -> None:
    """--limit 1 stops reading after one item: a million lines after it are never parsed."""
    with (tmp_path / "data.jsonl").open("a") as stream:
        stream.write("not json\n" * 1_000_000)
    assert eval_run(tmp_path, "--limit", "1") == 0
    assert len(scripted.calls) == 1


def test_a_fifo_in_a_dataset_is_not_a_regular_file(tmp_path: Path, scripted: ScriptedPipeline, capsys) -> None:
    os.mkfifo(tmp_path / "pipe.mp4")
    write_lines(tmp_path / "data.jsonl", [{**ITEMS[0], "video": "pipe.mp4"}])
    assert eval_run(tmp_path) == 2
    assert "video 'pipe.mp4' is not a regular file" in capsys.readouterr().err
    os.mkfifo(tmp_path / "data.fifo.jsonl")
    from loc3r.eval import cli as eval_cli

    assert eval_cli.main([str(tmp_path / "data.fifo.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert "is not a regular file" in capsys.readouterr().err
