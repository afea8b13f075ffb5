"""Issue 23, class 3: an answer is never about a video that has changed.

Each route that keeps something about a video between questions (the Pipeline's held
session, the CLI's encoding cache, the server's sessions and its media ETag) is asked about
video A, then A's path is made to hold video B in one of several ways, then asked again:
the answer must be B's, as a fresh pipeline gives it. The two videos are uncompressed (AVI,
raw YUV) with the same frame count and size, so their files have the same length and a
rewrite in place can put back both size and mtime.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from serve_helpers import chat_body, tiny_pipeline
from test_bad_input import ok_json, run

from loc3r.errors import InputError
from loc3r.identity import SAMPLE_BLOCK, file_identity
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline
from loc3r.serve.server import build_server, running
from loc3r.serve.settings import ServeSettings

FRAMES = 2
SAMPLING = SamplingConfig(max_new_tokens=3)


def raw_video(path: Path, seed: int, frames: int = 4, width: int = 64, height: int = 48) -> Path:
    """Uncompressed noise: every seed gives a file of the same size."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("rawvideo", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def copy_onto(target: Path, source: Path) -> None:
    """``cp B A``: a new file renamed onto the path (another inode)."""
    tmp = target.with_name(target.name + ".new")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def rewrite_in_place(target: Path, source: Path) -> None:
    """The same inode rewritten with B's bytes; size and mtime put back as they were."""
    before = target.stat()
    data = source.read_bytes()
    assert len(data) == before.st_size
    with target.open("r+b") as stream:
        stream.write(data)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


CHANGES: dict[str, Callable[[Path, Path], None]] = {
    "new file copied onto the path": copy_onto,
    "rewritten in place, size and mtime restored": rewrite_in_place,
}


@pytest.fixture
def videos(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(the path asked about, holding A; a copy of A; B)."""
    a = raw_video(tmp_path / "a.avi", seed=1)
    b = raw_video(tmp_path / "b.avi", seed=2)
    asked = tmp_path / "media" / "video.avi"
    asked.parent.mkdir()
    shutil.copyfile(a, asked)
    return asked, a, b


def fresh_answer(video: Path) -> tuple[list[int], object]:
    answer = Pipeline.from_pretrained("tiny").ask(video, "Where am I?", sampling=SAMPLING, num_frames=FRAMES)
    return answer.token_ids, answer.pose


# -- the identity itself ---------------------------------------------------------------------


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_identity_changes_with_the_file(change: str, videos: tuple[Path, Path, Path]) -> None:
    asked, _, b = videos
    before = file_identity(asked)
    assert file_identity(asked) == before
    CHANGES[change](asked, b)
    assert file_identity(asked) != before
    assert file_identity(asked).token() != before.token()


@pytest.mark.parametrize("offset", [0, SAMPLE_BLOCK * 3 + 5, -1])
def test_the_sample_digest_sees_a_flipped_byte_with_every_stamp_restored(offset: int, tmp_path: Path) -> None:
    """Small files are hashed whole; with ctime equal (as a coarse clock may leave it) the
    sampled digest still tells a flipped byte apart."""
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * (SAMPLE_BLOCK * 8 // 256))
    before = file_identity(path)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    after = file_identity(path)
    assert after.sample != before.sample and after.size == before.size


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.avi"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        file_identity(fifo)


# -- the routes ------------------------------------------------------------------------------


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_pipeline_never_answers_from_a_held_session_of_a_changed_video(change: str, videos: tuple[Path, Path, Path]) -> None:
    asked, a, b = videos
    expected_a, expected_b = fresh_answer(a), fresh_answer(b)
    assert expected_a != expected_b  # the test can tell the videos apart
    pipeline = Pipeline.from_pretrained("tiny")
    first = pipeline.ask(asked, "Where am I?", sampling=SAMPLING, num_frames=FRAMES)
    held = pipeline.open(asked, FRAMES)
    assert (first.token_ids, first.pose) == expected_a
    assert pipeline.open(asked, FRAMES) is held  # unchanged: the session is reused
    CHANGES[change](asked, b)
    assert pipeline.open(asked, FRAMES) is not held
    again = pipeline.ask(asked, "Where am I?", sampling=SAMPLING, num_frames=FRAMES)
    assert (again.token_ids, again.pose) == expected_b


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_cli_cache_never_answers_about_a_changed_video(change: str, videos: tuple[Path, Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    asked, a, b = videos
    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))
    argv = ["Where am I?", "--json", "--frames", str(FRAMES), "--max-new-tokens", "3"]
    fresh_b = ok_json(run(capsys, b, *argv, "--no-cache"))
    first = ok_json(run(capsys, asked, *argv))
    assert first["video"]["encoding_cache"] == "stored" and ok_json(run(capsys, asked, *argv))["video"]["encoding_cache"] == "hit"
    assert first["position"] != fresh_b["position"]
    CHANGES[change](asked, b)
    again = ok_json(run(capsys, asked, *argv))
    assert again["video"]["encoding_cache"] == "stored"
    assert (again["answer"], again["position"]) == (fresh_b["answer"], fresh_b["position"])


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_server_never_answers_about_or_serves_a_stale_video(change: str, videos: tuple[Path, Path, Path], tmp_path: Path) -> None:
    asked, a, b = videos
    pipeline = tiny_pipeline()
    expected_b = pipeline.ask(b, "Where am I?", sampling=SAMPLING, num_frames=FRAMES)
    pipeline.forget_video()
    settings = ServeSettings(media_dir=asked.parent, upload_dir=tmp_path / "uploads")
    body = chat_body(asked.name, "Where am I?", max_tokens=3, temperature=0, loc3r={"frames": FRAMES})
    with running(build_server(pipeline, settings)) as url:
        first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        kept = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        media = httpx.get(f"{url}/v1/videos/content", params={"url": asked.name}, timeout=30)
        assert (first["loc3r"]["server"]["session"], kept["loc3r"]["server"]["session"]) == ("opened", "kept")
        assert media.content == a.read_bytes()
        CHANGES[change](asked, b)
        again = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        revalidated = httpx.get(f"{url}/v1/videos/content", params={"url": asked.name},
                                headers={"If-None-Match": media.headers["etag"]}, timeout=30)
    assert again["loc3r"]["server"]["session"] == "opened"
    assert again["loc3r"]["position"] == pytest.approx(expected_b.pose.to_dict()["position"], abs=1e-5)
    assert first["loc3r"]["position"] != pytest.approx(again["loc3r"]["position"], abs=1e-5)
    assert revalidated.status_code == 200 and revalidated.content == b.read_bytes()
    assert revalidated.headers["etag"] != media.headers["etag"]
