"""Result provenance: one record per result file, refused on code that is not on main, and
every result older than the code it measures says so at the top of its .md."""

from __future__ import annotations

import os

import pytest

from loc3r.bench import provenance
from loc3r.errors import InputError


@pytest.mark.skipif(provenance.git("rev-parse", "--is-shallow-repository") != "false",
                    reason="needs the project's git history (no .git here, or a shallow clone)")
@pytest.mark.parametrize("stem", list(provenance.MEASURES))
def test_a_result_older_than_the_code_it_measures_says_so(stem: str) -> None:
    """Compares the commit each result records with the last commit in this checkout that
    touched the code it measures (``provenance.MEASURES``); a result without a commit, or with
    one that is not in the checkout's history, is stale too."""
    why = provenance.staleness(stem)
    assert why is None or provenance.says_stale(stem), (
        f"benchmarks/results/{stem}.md is stale ({why}) and does not say so at its top: re-measure it, or run "
        "`python -m loc3r.bench.provenance --mark-stale`"
    )


def test_a_record_holds_commit_command_load_before_and_after_and_cpu_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "reachable_from_main", lambda commit: True)
    monkeypatch.setattr(provenance, "dirty_files", lambda: [])
    recording = provenance.Recording("decode", ["python", "-m", "loc3r.bench.decode", "--repeats", "3"], "A B A B", 3)
    busy = sum(i * i for i in range(2_000_000))  # CPU work for cpu_s
    record = recording.finish()
    assert busy > 0
    assert record["commit"] == provenance.git("rev-parse", "HEAD") and record["reachable_from_main"] is True
    assert record["command"] == "python -m loc3r.bench.decode --repeats 3"
    assert len(record["load_before"]) == len(record["load_after"]) == 3
    assert record["cpu_s"] > 0 and record["wall_s"] > 0
    assert record["measures"] == list(provenance.MEASURES["decode"])
    assert record["machine"]["cores"] == os.cpu_count() and "simd" in record["machine"]
    lines = "\n".join(provenance.header(record))
    assert "load average (1, 5, 15 min) before" in lines and "CPU-s" in lines and record["commit"] in lines


@pytest.mark.parametrize("unreachable, dirty, fragment", [
    (True, [], "is not on main"),
    (False, ["runtime/session.py"], "has uncommitted changes in runtime/session.py"),
])
def test_code_not_on_main_is_refused_unless_allowed(
    unreachable: bool, dirty: list[str], fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provenance, "reachable_from_main", lambda commit: not unreachable)
    monkeypatch.setattr(provenance, "dirty_files", lambda: dirty)
    with pytest.raises(InputError, match=fragment):
        provenance.Recording("decode", ["x"], "A B A B", 3)
    allowed = provenance.Recording("decode", ["x"], "A B A B", 3, allow_unreachable=True).finish()
    assert "NOT reachable from main" in "\n".join(provenance.header(allowed))


def test_a_refusal_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(provenance, "reachable_from_main", lambda commit: False)
    monkeypatch.setattr(provenance, "dirty_files", lambda: [])
    with pytest.raises(SystemExit) as exit_info:
        provenance.start("decode", ["python", "-m", "loc3r.bench.decode"], "A B A B", 3)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("loc3r.bench.decode: error: the code to measure commit ") and "--allow-unreachable" in line


def test_dirty_files_are_named_whole() -> None:
    """``git status --porcelain`` lines start with a space for unstaged changes: the names
    must not lose their first letter."""
    for name in provenance.dirty_files():
        assert (provenance.ROOT / name).exists(), name


def test_mark_stale_puts_the_note_under_the_title(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(provenance, "RESULTS", tmp_path)
    (tmp_path / "decode.md").write_text("# Decoding\n\nCommand: `x`\n")
    assert not provenance.says_stale("decode")
    provenance.mark_stale("decode", "measured at abc")
    provenance.mark_stale("decode", "measured at def")  # replaces, never stacks
    text = (tmp_path / "decode.md").read_text()
    assert text.startswith("# Decoding\n\n**Stale:** measured at def.") and text.count("**Stale:**") == 1
    assert provenance.says_stale("decode")
