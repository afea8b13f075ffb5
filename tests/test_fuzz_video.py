"""Fuzzing the video reader: damaged files give frames or an ``InputError``, nothing else.

Small valid videos (written here) are mutated with seeded random byte flips, truncations,
insertions, deletions and duplicated spans; ``read_video(path, 4)`` runs on each in a
worker subprocess with a per-case timeout. Every case must return RGB uint8 frames or
raise ``InputError``: no hang, no crash of the process, no other exception type.

CI runs 200 cases (about a second: the files are tiny). A longer run (see docs/robustness.md)::

    LOC3R_FUZZ_CASES=2000 /work/venv/bin/python -m pytest -q tests/test_fuzz_video.py

``LOC3R_FUZZ_SEED`` picks another seed; a failure names the seed, the case and the
mutation, and leaves the file in pytest's tmp folder to reproduce it with.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from loc3r.runtime.demo_video import write_demo_video

CASES = int(os.environ.get("LOC3R_FUZZ_CASES", "200"))
SEED = int(os.environ.get("LOC3R_FUZZ_SEED", "8"))
TIMEOUT_S = 10.0

WORKER = r"""
import json, sys, traceback
import numpy as np
from loc3r.errors import InputError
from loc3r.runtime.video import read_video

for line in sys.stdin:
    path = line.strip()
    try:
        video = read_video(path, 4)
        shapes_ok = bool(video.frames) and all(
            f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3 and f.shape[0] > 0 and f.shape[1] > 0
            for f in video.frames
        )
        result = {"outcome": "frames" if shapes_ok else "bad frames", "frames": len(video.frames)}
    except InputError as exc:
        result = {"outcome": "InputError", "message": str(exc)}
    except BaseException as exc:
        result = {"outcome": type(exc).__name__, "message": traceback.format_exc()}
    print(json.dumps(result), flush=True)
"""


class Worker:
    """A subprocess reading videos; restarted after a crash or a timeout."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        self.lines = queue.Queue()
        stdout = self.process.stdout

        def pump() -> None:
            for line in stdout:
                self.lines.put(line)
            self.lines.put(None)  # the process ended

        threading.Thread(target=pump, daemon=True).start()

    def read(self, path: Path) -> dict[str, object]:
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        try:
            line = self.lines.get(timeout=TIMEOUT_S)
        except queue.Empty:
            self.stop()
            return {"outcome": f"timeout after {TIMEOUT_S:.0f} s"}
        if line is None:
            code = self.process.wait()
            self.process = None
            return {"outcome": f"crash (exit code {code})"}
        return json.loads(line)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random damage of ``data``, and a description of it."""
    buf = bytearray(data)
    kind = rng.choice(["flip", "truncate", "insert", "delete", "duplicate", "flip+truncate"])
    if kind in ("flip", "flip+truncate"):
        positions = rng.integers(0, len(buf), int(rng.integers(1, 40)))
        for pos in positions:
            buf[pos] ^= 1 << int(rng.integers(0, 8))
    if kind in ("truncate", "flip+truncate"):
        buf = buf[: int(rng.integers(1, len(buf)))]
    if kind == "insert":
        pos = int(rng.integers(0, len(buf)))
        buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 512)), dtype=np.uint8).tobytes()
    if kind == "delete":
        pos = int(rng.integers(0, len(buf)))
        del buf[pos : pos + int(rng.integers(1, 512))]
    if kind == "duplicate":
        pos, size = int(rng.integers(0, len(buf))), int(rng.integers(1, 2048))
        buf[pos:pos] = buf[pos : pos + size]
    return bytes(buf), str(kind)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A faststart mp4, an mp4 with its index at the end, and an mkv."""
    folder = tmp_path_factory.mktemp("fuzz_sources")
    paths = [write_demo_video(folder / "faststart.mp4", num_frames=12, width=64, height=48)]
    for name, options in (("index_at_end.mp4", {}), ("clip.mkv", {})):
        path = folder / name
        with av.open(str(path), mode="w", options=options) as container:
            stream = container.add_stream("mpeg4", rate=6)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for i in range(10):
                rgb = np.full((48, 64, 3), 20 * i, np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            container.mux(stream.encode(None))
        paths.append(path)
    return paths


def test_sources_are_readable(sources: list[Path]) -> None:
    worker = Worker()
    try:
        for path in sources:
            assert worker.read(path) == {"outcome": "frames", "frames": 4}
    finally:
        worker.stop()


def test_mutated_videos_give_frames_or_input_error(sources: list[Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    originals = [path.read_bytes() for path in sources]
    worker = Worker()
    failures, outcomes = [], {}
    try:
        for case in range(CASES):
            source = int(rng.integers(0, len(sources)))
            data, kind = mutate(originals[source], rng)
            path = tmp_path / f"case{case:05d}{sources[source].suffix}"
            path.write_bytes(data)
            result = worker.read(path)
            outcome = str(result["outcome"])
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome in ("frames", "InputError"):
                if outcome == "InputError":
                    assert "\n" not in str(result["message"])  # one line for the CLI
                path.unlink()
            else:
                failures.append(f"seed {SEED} case {case} ({kind} of {sources[source].name}, kept at {path}): {result}")
    finally:
        worker.stop()
    assert not failures, "\n".join(failures[:5]) + f"\noutcomes: {outcomes}"
    assert outcomes.get("frames", 0) + outcomes.get("InputError", 0) == CASES
