"""Result provenance: one record per result file, refused on code that is not on main, and
every result older than the code it measures says so at the top of its .md."""

from __future__ import annotations

import json
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
    assert record["machine"]["cpus_allowed"] == sorted(os.sched_getaffinity(0))


def test_a_pinned_run_says_which_cpus_its_pools_had() -> None:
    """A run under ``taskset`` (fewer CPUs than the machine has) says so in its header."""
    machine = {"cpu": "x", "cores": 4, "cpus_allowed": [1], "ram_gib": 8, "simd": ["avx2"]}
    assert provenance.placement(machine) == " (this run confined to CPU 1)"
    assert provenance.placement(machine | {"cpus_allowed": [0, 1, 2, 3]}) == ""
    assert provenance.placement({"cores": 2}) == ""  # an older record


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


def test_every_result_file_has_a_measures_entry() -> None:
    """A result in benchmarks/results that MEASURES does not name could never be found stale."""
    stems = {path.stem for path in provenance.RESULTS.iterdir() if path.suffix in (".md", ".json")}
    assert stems and not stems - set(provenance.MEASURES), sorted(stems - set(provenance.MEASURES))


def _allow_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "reachable_from_main", lambda commit: True)
    monkeypatch.setattr(provenance, "dirty_files", lambda: [])


def test_llm_export_memory_writes_the_record_and_labels_the_extrapolation(monkeypatch: pytest.MonkeyPatch) -> None:
    from loc3r.bench import llm_export_memory as bench

    _allow_this_checkout(monkeypatch)
    recording = provenance.start("llm_export_memory", ["python", "-m", "loc3r.bench.llm_export_memory"], "one at a time", 1)
    peaks = {(1, 32000): 1.5, (2, 32000): 1.7, (1, 152064): 2.6}
    monkeypatch.setattr(bench, "write_checkpoint", lambda folder, layers, vocab: None)
    monkeypatch.setattr(bench, "loc3r_peak", lambda checkpoint, out, layers, vocab, form: peaks[(layers, vocab)])
    result = bench.run(False, list(bench.CASES), recording)
    record = result["provenance"]
    assert {"commit", "command", "load_before", "load_after", "wall_s", "cpu_s", "machine"} <= set(record)
    loc3r = result["peak_rss_gib"]["cpu (fp32)"]["loc3r"]
    assert loc3r["28 layers, vocab 152064 (extrapolated)"] == pytest.approx(2.6 + 27 * 0.2)
    text = bench.to_markdown(result)
    assert "Extrapolated, not measured" in text and record["commit"] in text and "CPU-s" in text
    one = bench.run(False, [(1, 32000)], provenance.start("llm_export_memory", ["x"], "one at a time", 1))
    assert list(one["peak_rss_gib"]["cpu (fp32)"]["loc3r"]) == ["1 layers, vocab 32000"]  # no line through one point


@pytest.mark.parametrize("text, message", [("1x32000", "is not LAYERS:VOCAB"), ("0:32000", "at least 1")])
def test_llm_export_memory_refuses_a_bad_case(text: str, message: str) -> None:
    from loc3r.bench.llm_export_memory import parse_case

    with pytest.raises(Exception, match=message):
        parse_case(text)


def test_header_prints_a_records_lines_or_refuses_in_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """For a .md written by hand from a benchmark's JSON (scenes, scenes_serve)."""
    record = provenance.Recording("scenes_small", ["python", "-m", "loc3r.bench.scenes"], "A B A B", 3, allow_unreachable=True).finish()
    (tmp_path / "r.json").write_text(json.dumps({"provenance": record}))
    assert provenance.main(["--header", str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().out.splitlines() == provenance.header(record)
    (tmp_path / "old.json").write_text(json.dumps({"provenance": {"commit": "abc"}}))
    assert provenance.main(["--header", str(tmp_path / "old.json")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "holds no complete provenance record" in line and "re-run its benchmark" in line


def test_serve_load_pools_rounds_and_reports_each_ratios_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds pool into one phase (every question, summed wall); the report gives the pooled
    ratio and its range over the rounds, under the provenance header."""
    from loc3r.bench import serve_load as bench

    def phase(ttft: float, wall: float, session: str = "kept") -> bench.Phase:
        return bench.Phase([bench.Outcome(0, "v", ttft, ttft, 0.0, ttft, session, 0) for _ in range(4)], [], wall)

    rounds = [{"first": phase(2.0, 2.0, "opened"), "alone": phase(0.5, 2.0), "cached_first": phase(1.0, 4.0), "fifo": phase(f, 4.0)}
              for f in (1.5, 2.5)]
    pooled = bench.pooled([r["fifo"] for r in rounds])
    assert len(pooled.outcomes) == 8 and pooled.wall_s == 8.0
    summaries = {name: bench.pooled([r[name] for r in rounds]).summary() for name in bench.COLUMNS}
    per_round = [bench.phase_ratios({n: p.summary() for n, p in r.items()}) for r in rounds]
    assert [r["fifo_over_cached_first_p50"] for r in per_round] == [1.5, 2.5]
    _allow_this_checkout(monkeypatch)
    record = provenance.start("serve_load_tiny", ["python", "-m", "loc3r.bench.serve_load"], "A B, B A", 2).finish()
    result = {"provenance": record, "machine": {"torch_threads": 2}, "model": "tiny", "phases": summaries,
              "settings": {"clients": 8, "questions": 4, "videos": 1, "frames": 2, "max_tokens": 2, "queue": 16, "rounds": 2},
              "ratios": bench.phase_ratios(summaries),
              "ratios_per_round": {key: [r[key] for r in per_round] for key in per_round[0]}}
    text = bench.markdown(result)
    assert "| client TTFT p50, first come first served / cached video first | 2.000 (1.500-2.500) |" in text
    assert "\n".join(provenance.header(record)) in text and "2 rounds" in text


def test_loc3r_bench_refuses_dirty_code_only_for_a_result_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing into benchmarks/results needs code on main; a user's run elsewhere is recorded
    as it is (its header says the code is not on main)."""
    from loc3r.bench.cli import bench_parser, recording_for

    monkeypatch.setattr(provenance, "reachable_from_main", lambda commit: True)
    monkeypatch.setattr(provenance, "dirty_files", lambda: ["runtime/session.py"])
    into = ["--model", "small", "--json", str(provenance.RESULTS / "bench_small.json")]
    with pytest.raises(InputError, match="uncommitted changes in runtime/session.py"):
        recording_for(bench_parser().parse_args(into), into)
    elsewhere = ["--model", "small", "--fresh-process", "--json", "/tmp/mine.json"]
    record = recording_for(bench_parser().parse_args(elsewhere), elsewhere).finish()
    assert record["result"] == "mine" and record["repeats"] == 3 and "fresh process" in record["interleaving"]
    assert "NOT reachable from main" in "\n".join(provenance.header(record))
