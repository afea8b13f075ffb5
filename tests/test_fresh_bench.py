"""``loc3r-bench --fresh-process``'s measurement of a process from outside, on a fake
command whose timing and memory are known."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from loc3r.bench.fresh import pinned, run_fresh, run_process
from loc3r.errors import InputError

FAKE = """
import sys, time
buf = bytearray(200 * 2**20)  # touch 200 MiB
for i in range(0, len(buf), 4096):
    buf[i] = 1
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("Q: q\\nA: ", end="", flush=True)
time.sleep(0.4)
print("tok", flush=True)
print("first token after 0.250 s", flush=True)
time.sleep(0.4)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture()
def fake(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake.py"
    script.write_text(FAKE, encoding="utf-8")
    return [sys.executable, str(script)]


def test_a_process_is_measured_from_outside(fake: list[str]) -> None:
    run = run_process([*fake, "0"])
    assert run.ttft == 0.25  # its own line
    assert run.peak_rss >= 200  # VmHWM saw the touched buffer
    assert run.cpu_to_first_token >= 0.3 and run.cpu >= run.cpu_to_first_token
    assert run.start_to_first_token >= 0.3 + 0.4  # the token, not "A: " (0.4 s before it)
    assert run.wall - run.start_to_first_token >= 0.4  # ... and 0.4 s before the end


def test_a_failed_run_is_an_error(fake: list[str]) -> None:
    with pytest.raises(InputError, match="failed \\(exit 3\\)"):
        run_process([*fake, "3"])


def test_sides_alternate_and_ratios_are_baseline_over_side(fake: list[str]) -> None:
    order: list[str] = []
    doc = run_fresh({"a": [*fake, "0"], "b": [*fake, "0"]}, repeat=2, warmup=1, log=order.append)
    assert order == ["warm-up 1: a", "warm-up 1: b", "run 2: b", "run 2: a", "run 3: a", "run 3: b"]
    assert len(doc["runs"]["a"]) == len(doc["runs"]["b"]) == 2
    medians = doc["medians"]
    assert doc["ratios"]["b"]["cpu"] == pytest.approx(medians["a"]["cpu"] / medians["b"]["cpu"])
    assert len(doc["load_average_before"]) == len(doc["load_average_after"]) == 3



PINNED = """
import os, sys
expected = {int(c) for c in sys.argv[1].split(",")}
print("Q: q\\nA: x", flush=True)
print("first token after 0.1 s", flush=True)
sys.exit(0 if os.sched_getaffinity(0) == expected else 5)
"""


def test_cpus_pin_each_side_before_it_starts(tmp_path: Path) -> None:
    """--cpus: each side's process runs on those CPUs only (thread pools size themselves
    from its affinity; the child exits 5 otherwise); the report says how sides were placed."""
    script = tmp_path / "pinned.py"
    script.write_text(PINNED, encoding="utf-8")
    first = min(os.sched_getaffinity(0))
    side = [sys.executable, str(script), str(first)]
    doc = run_fresh({"a": side, "b": side}, repeat=1, warmup=0, cpus=frozenset({first}))
    assert doc["cpus"] == [first]
    if len(os.sched_getaffinity(0)) > 1:  # unpinned, the child sees every CPU and fails
        with pytest.raises(InputError, match="exit 5"):
            run_process(side)
    assert pinned(doc["cpus"]) == f"each side pinned to CPU {first} (1 thread(s) per side)"
    assert pinned(None) == "each side on every CPU (default threads)"


@pytest.mark.parametrize(("argv", "message"), [
    (["--cpus", "0"], "--cpus applies to --fresh-process runs only"),
    (["--fresh-process", "--cpus", "x"], "is not a comma-separated list of CPU numbers"),
    (["--fresh-process", "--cpus", "9999"], "CPU(s) 9999 not available here"),
])
def test_cpus_refused_with_the_fix(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from loc3r.bench.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusal of a bad value
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_every_side_runs_with_the_baselines_best_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OMP_WAIT_POLICY=PASSIVE reaches every side (torch's threads would spin-wait otherwise),
    unless the caller's environment sets its own value."""
    script = tmp_path / "env.py"
    script.write_text("import os\nprint('A: ' + os.environ.get('OMP_WAIT_POLICY', 'unset'), flush=True)\n"
                      "print('first token after 0.1 s')\n", encoding="utf-8")
    seen: list[str] = []
    real = run_process

    def spy(argv, env=None, timeout_s=3600.0, cpus=None):  # noqa: ANN001, ANN202
        seen.append(env.get("OMP_WAIT_POLICY"))
        return real(argv, env, timeout_s, cpus)

    monkeypatch.setattr("loc3r.bench.fresh.run_process", spy)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    doc = run_fresh({"a": [sys.executable, str(script)], "b": [sys.executable, str(script)]}, repeat=1, warmup=0)
    assert seen == ["PASSIVE", "PASSIVE"] and doc["environment"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert run_fresh({"a": [sys.executable, str(script)]}, repeat=1, warmup=0)["environment"] == {"OMP_WAIT_POLICY": "ACTIVE"}


@pytest.mark.parametrize("stem", ["fresh_small", "fresh_small_2cpu"])
def test_the_recorded_report_is_what_its_json_renders_to(stem: str) -> None:
    """A recorded ``.md`` is ``render_fresh`` of its JSON (no figure edited by hand)."""
    from loc3r.bench.fresh import render_fresh
    from loc3r.bench.provenance import RESULTS, without_stale_note

    doc = json.loads((RESULTS / f"{stem}.json").read_text(encoding="utf-8"))
    assert without_stale_note((RESULTS / f"{stem}.md").read_text(encoding="utf-8")) == render_fresh(doc)
