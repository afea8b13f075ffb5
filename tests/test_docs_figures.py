"""Figures the docs quote beside a result file are that file's figures, and a stale one says so.

A *unit* of a document is one table row, one list item or one paragraph (code blocks are
skipped). In a unit that names ``benchmarks/results/NAME.md`` (or ``.json``), every figure
(a number with a decimal point or an exponent, or followed by a unit: ``x``, ``s``, ``ms``,
``min``, ``MiB``, ``GiB``, ``GB``, ``MB``, ``tok/s``, ``%``) must appear in one of the named
result files, ``.md`` or ``.json``: a result number matches when, rounded to the figure's
last written digit, it equals the figure (``1.2x`` matches ``1.2012``; ``23%`` also matches
``0.23``). Not checked: bounds and tolerances (a figure after "within", "tolerance", "under",
"<", ">=", "~", ...), text in backticks (commands, paths), numbers with a second dot
(versions). A unit that names a result whose ``.md``
carries the **Stale:** note must say "stale" itself. Every result file prints the command that
made it near its top, so a quoted figure is reproducible from the link beside it.

Mutation check (done on 2026-12-07): change ``**0.99x**`` in docs/status.md's cold-start row to
``**0.98x**``: ``test_quoted_figures_are_in_their_result_files`` fails with
``docs/status.md:33: '0.98x' is not in benchmarks/results/fresh_small.md/.json``; delete
", stale: measured at bdca96a ..." from the FP16 row naming ``real_size.md``:
``test_a_stale_result_is_quoted_as_stale`` fails naming that line and file. The last test below
runs both mutations on a small copy in CI. After a result is re-recorded, the failures list
every figure to update (doc line, figure, result file); a result that is no longer stale can
drop its "stale" words.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from loc3r.bench import provenance

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("docs/status.md", "docs/user-guide.md", "docs/architecture.md", "docs/robustness.md", "README.md",
        "benchmarks/README.md")
RESULT_LINK = re.compile(r"benchmarks/results/([A-Za-z0-9_]+)\.(?:md|json)")
NUMBER = r"(?<![\w./:#])(?<![A-Za-z]-)(\d+(?:\.\d+)?(?:e-\d+)?)(?![\w.]*\d)"
UNIT = r"(?:[x×%]|\s?(?:ms|min|minutes|MiB|GiB|GB|MB|KiB|tok/s)|\ss)(?![\w/])"
FIGURE = re.compile(NUMBER + r"(" + UNIT + r"|(?=\s/\s\d))?")
BOUND = re.compile(r"(within|tolerance|under|below|above|over|at most|at least|about|<|>|<=|>=|≤|≥|~)\s*$", re.I)
RESULT_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
NEW_UNIT = re.compile(r"^\s*(\||[-*] |\d+\. |#)")


@dataclass(frozen=True)
class Unit:
    """One table row, list item or paragraph of a document, with its first line's number."""

    doc: str
    line: int
    text: str


def units(doc: str) -> list[Unit]:
    """The units of ``doc`` (relative to the repository root), code blocks left out."""
    found: list[Unit] = []
    current: list[str] = []
    start = 0
    fenced = False
    for number, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            line = ""
        if fenced or not line.strip() or NEW_UNIT.match(line):
            if current:
                found.append(Unit(doc, start, " ".join(current)))
            current, start = ([line], number) if line.strip() and not fenced else ([], number)
            continue
        if not current:
            start = number
        current.append(line)
    if current:
        found.append(Unit(doc, start, " ".join(current)))
    return found


def figures(text: str) -> list[str]:
    """The figures a unit quotes (see the module docstring for what counts)."""
    prose = re.sub(r"`[^`]*`", " ", re.sub(r"\]\([^)]*\)", "]", text))
    out = []
    for match in FIGURE.finditer(prose):
        number, unit = match.group(1), match.group(2)
        if not (unit is not None or "." in number or "e" in number) or BOUND.search(prose[max(0, match.start() - 12):match.start()]):
            continue
        out.append(match.group(0).strip())
    return out


def _quantum(number: str) -> float:
    """Half of the figure's last written digit's place value."""
    mantissa, _, exponent = number.partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def in_result(figure: str, values: list[float]) -> bool:
    """``figure`` equals one of ``values`` rounded to the figure's last written digit."""
    number = FIGURE.match(figure).group(1)
    target, tol = float(number), _quantum(number) * (1 + 1e-9)
    candidates = [target, target / 100] if figure.endswith("%") else [target]
    return any(abs(value - want) <= tol * (want / target if target else 1) for want in candidates for value in values)


def result_values(stem: str) -> list[float]:
    """Every number in ``benchmarks/results/<stem>.md`` and ``.json``."""
    text = ""
    for suffix in (".md", ".json"):
        path = provenance.RESULTS / f"{stem}{suffix}"
        if path.is_file():
            text += path.read_text(encoding="utf-8") + "\n"
    if not text:
        raise AssertionError(f"benchmarks/results/{stem}.md is named in the docs but does not exist")
    return [float(v) for v in RESULT_NUMBER.findall(text)]


def quoting_units() -> list[tuple[Unit, list[str]]]:
    """Each unit that names at least one result file, with the stems it names."""
    found = []
    for doc in DOCS:
        for unit in units(doc):
            stems = sorted(set(RESULT_LINK.findall(unit.text)))
            if stems:
                found.append((unit, stems))
    return found


def test_quoted_figures_are_in_their_result_files():
    values = {}
    missing = []
    for unit, stems in quoting_units():
        for stem in stems:
            values.setdefault(stem, result_values(stem))
        for figure in figures(unit.text):
            if not any(in_result(figure, values[stem]) for stem in stems):
                names = " or ".join(f"benchmarks/results/{stem}.md/.json" for stem in stems)
                missing.append(f"{unit.doc}:{unit.line}: '{figure}' is not in {names}")
    assert not missing, "figures quoted beside a result file that it does not hold:\n" + "\n".join(missing)


def test_a_stale_result_is_quoted_as_stale():
    unmarked = [f"{unit.doc}:{unit.line}: names benchmarks/results/{stem}.md, which is stale, without saying 'stale'"
                for unit, stems in quoting_units() for stem in stems
                if provenance.says_stale(stem) and figures(unit.text) and "stale" not in unit.text.lower()]
    assert not unmarked, "\n".join(unmarked)


def test_the_checks_catch_a_changed_figure_and_a_lost_stale_note(tmp_path, monkeypatch):
    """The mutation of the module docstring, on a copy: a changed figure and a dropped note fail."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "r.md").write_text("# r\n\n**Stale:** old.\n\nratio 1.2012x, 14.59 GiB\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text(json.dumps({"share": 0.23}))
    (tmp_path / "doc.md").write_text("| a | 1.20x, 14.59 GiB, 23%, stale | `benchmarks/results/r.md` |\n\n"
                                     "Speed 1.21x within 5e-2 ([r](benchmarks/results/r.md)).\n")
    monkeypatch.setattr(provenance, "RESULTS", tmp_path / "benchmarks" / "results")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "DOCS", ("doc.md",))
    with pytest.raises(AssertionError, match=r"doc.md:3: '1.21x' is not in benchmarks/results/r.md") as failed:
        test_quoted_figures_are_in_their_result_files()
    assert "1.20x" not in str(failed.value) and "5e-2" not in str(failed.value)
    with pytest.raises(AssertionError, match=r"doc.md:3: names benchmarks/results/r.md, which is stale"):
        test_a_stale_result_is_quoted_as_stale()


COMMAND = re.compile(r"^(Command: |Generated by `)", re.M)


def test_every_result_prints_its_command_at_its_top():
    """What makes a quoted figure reproducible: its result file says how it was made."""
    silent = [md.name for md in sorted(provenance.RESULTS.glob("*.md"))
              if not COMMAND.search("\n".join(md.read_text(encoding="utf-8").splitlines()[:20]))]
    assert not silent, f"results that print no command ('Command: ...' in their first 20 lines): {silent}"
