"""Scene memory: a video prefix's KV stored, reloaded in a new process, verified, kept under
a budget; poses without an answer, batched over the shared prefix."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loc3r.models.config import LLMConfig
from loc3r.models.llm import TorchLLM, build_qwen2
from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.scene_store import KVLayout, Scene, SceneStore, quantize_int8

SAMPLING = SamplingConfig(max_new_tokens=6)
SITUATIONS = ["I am by the sink, the fridge on my left.", "Standing at the door", "", "sitting on the bed facing the window"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scenes")
    return (write_demo_video(root / "a.mp4", num_frames=12, width=96, height=64),
            write_demo_video(root / "b.mp4", num_frames=9, width=128, height=96))


@pytest.fixture(scope="module")
def held() -> Pipeline:
    return Pipeline.from_pretrained("tiny")


def assert_same_pose(a, b, tol: float = 1e-5) -> None:  # noqa: ANN001 - Poses
    for name in ("x", "y", "sigma", "theta_rad"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), abs=tol)


def run_json(home: Path, *argv: str) -> dict:
    script = Path(sys.executable).with_name("loc3r-run")
    result = subprocess.run([str(script), *argv, "--json"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LOC3R_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_a_stored_scene_reloaded_in_a_new_process_answers_as_the_held_session(
    held: Pipeline, videos: tuple[Path, Path], tmp_path: Path
) -> None:
    argv = (str(videos[0]), "What is on my left?", "--situation", SITUATIONS[0], "--frames", "3", "--max-new-tokens", "6")
    first = run_json(tmp_path, *argv)
    again = run_json(tmp_path, *argv)
    assert first["video"]["scene"] == "stored" and again["video"]["scene"] == "loaded"
    assert "scene_load" in again["timings"] and "prefill_video" not in again["timings"]
    expected = held.open(videos[0], 3).ask("What is on my left?", SITUATIONS[0], SAMPLING)
    for answer in (first, again):
        assert answer["answer_token_ids"] == expected.token_ids
        for axis in ("x", "y", "sigma"):
            assert answer["position"][axis] == pytest.approx(getattr(expected.pose, axis), abs=1e-5)
        assert answer["orientation"]["theta_rad"] == pytest.approx(expected.pose.theta_rad, abs=1e-5)


def damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def foreign(path: Path, donor: Path) -> None:
    shutil.copyfile(donor, path)


@pytest.mark.parametrize("spoil, reason", [(damage, "checksum mismatch"), (foreign, "belongs to another video")])
def test_a_damaged_or_foreign_scene_is_discarded_with_one_warning(
    held: Pipeline, videos: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil, reason: str  # noqa: ANN001
) -> None:
    pipeline = Pipeline.from_pretrained("tiny", cache_dir=tmp_path)
    pipeline.open(videos[0], 3)
    pipeline.forget_video()
    pipeline.open(videos[1], 2)
    pipeline.forget_video()
    path = pipeline.scenes.path(pipeline.scene_key(videos[0], 3))
    spoil(path) if spoil is damage else spoil(path, pipeline.scenes.path(pipeline.scene_key(videos[1], 2)))
    with caplog.at_level(logging.WARNING):
        session = pipeline.open(videos[0], 3)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0].getMessage() and path.name in warnings[0].getMessage()
    assert session.report == {"encoding_cache": "hit", "scene": "stored"}  # recomputed and stored again
    expected = held.open(videos[0], 3).ask("Where am I?", sampling=SAMPLING)
    assert session.ask("Where am I?", sampling=SAMPLING).token_ids == expected.token_ids


def test_a_changed_video_is_never_answered_from_a_stored_scene(held: Pipeline, videos: tuple[Path, Path], tmp_path: Path) -> None:
    video = tmp_path / "room.mp4"
    shutil.copyfile(videos[0], video)
    pipeline = Pipeline.from_pretrained("tiny", cache_dir=tmp_path / "cache")
    pipeline.open(video, 3)
    pipeline.forget_video()
    shutil.copyfile(videos[1], video)  # same path, other content
    session = pipeline.open(video, 3)
    assert session.report.get("scene") == "stored" and session.report.get("encoding_cache") == "stored"
    expected = held.open(videos[1], 3).ask("Where am I?", sampling=SAMPLING)
    answer = session.ask("Where am I?", sampling=SAMPLING)
    assert answer.token_ids == expected.token_ids
    assert_same_pose(answer.pose, expected.pose)


def test_pose_only_equals_the_pose_of_a_full_question(held: Pipeline, videos: tuple[Path, Path]) -> None:
    session = held.open(videos[1], 3)
    prefix = held.stages.llm.cached_length
    poses = session.locate(SITUATIONS)
    assert held.stages.llm.cached_length == prefix  # cut back
    for situation, pose in zip(SITUATIONS, poses, strict=True):
        assert_same_pose(pose, session.ask("What is in front of me?", situation, SAMPLING).pose)


def test_onnxruntime_pose_only_and_kv_round_trip(cpu_export: Path, videos: tuple[Path, Path], tmp_path: Path) -> None:
    pipeline = Pipeline.from_pretrained("tiny", backend="onnxruntime", engines=cpu_export, cache_dir=tmp_path)
    session = pipeline.open(videos[0], 2)
    assert session.report["scene"] == "stored" and pipeline.stages.llm.kv_dtype == "float32"
    full = session.ask("Where am I?", SITUATIONS[1], SAMPLING)
    assert_same_pose(session.locate([SITUATIONS[1]])[0], full.pose)
    pipeline.forget_video()
    reloaded = pipeline.open(videos[0], 2)
    assert reloaded.report["scene"] == "loaded"
    again = reloaded.ask("Where am I?", SITUATIONS[1], SAMPLING)
    assert again.token_ids == full.token_ids
    assert_same_pose(again.pose, full.pose)


def test_batched_situations_equal_one_at_a_time(held: Pipeline, videos: tuple[Path, Path]) -> None:
    session = held.open(videos[0], 3)
    one_by_one = [session.locate([s])[0] for s in SITUATIONS]
    llm = held.stages.llm
    chunk = llm.chunk_tokens
    try:
        for limit in (chunk, 12):  # all packed in one pass; groups of whole suffixes
            llm.chunk_tokens = limit
            for pose, alone in zip(session.locate(SITUATIONS * 3), one_by_one * 3, strict=True):
                assert_same_pose(pose, alone)
    finally:
        llm.chunk_tokens = chunk


def test_packed_branches_equal_separate_prefills() -> None:
    torch.manual_seed(0)
    config = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    llm = TorchLLM(build_qwen2(config), chunk_tokens=16)
    llm.prefill(llm.embed(list(range(30))))
    suffixes = [torch.randn(n, 64) for n in (3, 7, 5, 20, 1)]
    separate = []
    for suffix in suffixes:
        separate.append(llm.prefill(suffix).hidden_states)
        llm.truncate(30)
    for packed, alone in zip(llm.prefill_branches(suffixes), separate, strict=True):
        torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert llm.cached_length == 30


def test_torch_kv_round_trip_keeps_room_to_grow() -> None:
    torch.manual_seed(0)
    config = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    llm = TorchLLM(build_qwen2(config))
    embeds = llm.embed(list(range(40)))
    llm.prefill(embeds[:30])
    arrays = llm.read_kv()
    assert llm.kv_layout == (4, 2, 16, "float32") and [a.shape for a in arrays] == [(2, 30, 16)] * 4
    expected = llm.prefill(embeds[30:]).hidden_states
    other = TorchLLM(llm.model)
    other.write_kv(arrays)
    buffer = other.cache.layers[0]._key_buffer
    assert other.cached_length == 30 and buffer.shape[-2] == 30 + other.chunk_tokens
    torch.testing.assert_close(other.prefill(embeds[30:]).hidden_states, expected, rtol=0, atol=0)
    assert other.cache.layers[0]._key_buffer is buffer  # the question went into the spare room


def scene(length: int, seed: int) -> Scene:
    rng = np.random.default_rng(seed)
    kv = [rng.standard_normal((2, length, 8)).astype(np.float32) for _ in range(4)]
    return Scene(kv, "float32", length - 2, [0, 5], [0.0, 0.5], 1.0)


def test_the_store_evicts_the_least_recently_used_scene_beyond_its_budget(tmp_path: Path) -> None:
    layout = KVLayout(4, 2, 8, "float32")
    size = len(scene(100, 0).kv) * scene(100, 0).kv[0].nbytes
    store = SceneStore(tmp_path, budget_bytes=int(2.5 * size))
    store.store("a", scene(100, 0))
    store.store("b", scene(100, 1))
    os.utime(store.path("a"), (1, 1))
    os.utime(store.path("b"), (2, 2))
    assert store.load("a", layout) is not None  # used: now the most recent
    store.store("c", scene(100, 2))
    assert [e.key for e in store.entries()] == ["a", "c"]
    assert store.total_bytes() <= store.budget_bytes
    np.testing.assert_array_equal(store.load("c", layout).kv[3], scene(100, 2).kv[3])
    assert SceneStore(tmp_path / "small", budget_bytes=size // 2).store("d", scene(100, 3)) is None  # alone too big


def test_int8_scenes_are_a_quarter_of_float32_and_close(tmp_path: Path) -> None:
    layout = KVLayout(4, 2, 8, "float32")
    original = scene(500, 4)
    plain = SceneStore(tmp_path / "plain").store("k", original)
    packed = SceneStore(tmp_path / "int8", compression="int8").store("k", original)
    assert packed.stat().st_size < 0.3 * plain.stat().st_size
    loaded = SceneStore(tmp_path / "int8", compression="int8").load("k", layout)
    for got, want in zip(loaded.kv, original.kv, strict=True):
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got - want) <= step / 2 + 1e-7)
    q, scale = quantize_int8(np.zeros((1, 3, 2), dtype=np.float32))
    assert not q.any() and np.all(scale == 1)


def test_a_scene_of_another_dtype_or_shape_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = SceneStore(tmp_path)
    store.store("k", scene(10, 5))
    with caplog.at_level(logging.WARNING):
        assert store.load("k", KVLayout(4, 2, 8, "float16")) is None
    assert "its KV is float32, the LLM's is float16" in caplog.text and not store.path("k").exists()
    store.store("k", scene(10, 5))
    assert store.load("k", KVLayout(4, 2, 16, "float32")) is None and not store.path("k").exists()


def test_scenes_by_name_and_pose_only_on_the_command_line(
    held: Pipeline, videos: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from loc3r.runtime import cli, scene_cli

    monkeypatch.setenv("LOC3R_HOME", str(tmp_path))
    assert scene_cli.main(["add", "kitchen", str(videos[1]), "--frames", "3"]) == 0
    assert "scene kitchen:" in capsys.readouterr().out
    assert scene_cli.main(["list", "--json"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["video"] == str(videos[1].resolve()) and listed["frames"] == 3 and listed["stored_bytes"] > 0
    assert cli.main(["--scene", "kitchen", "--pose-only", *SITUATIONS[:2], "--json"]) == 0
    outputs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["video"]["scene"] for o in outputs] == ["loaded", "loaded"]
    expected = held.open(videos[1], 3).locate(SITUATIONS[:2])
    for out, pose in zip(outputs, expected, strict=True):
        assert out["position"]["x"] == pytest.approx(pose.x, abs=1e-5) and out["orientation"]["theta_rad"] == pytest.approx(pose.theta_rad, abs=1e-5)
        assert "answer" not in out
    assert scene_cli.main(["rm", "kitchen"]) == 0
    assert not list((tmp_path / "cache" / "encodings" / "scenes").iterdir())
    capsys.readouterr()
    assert cli.main(["--scene", "kitchen", "Where am I?"]) == 2
    assert capsys.readouterr().err.strip() == ("loc3r-run: error: no scene named 'kitchen' (known: none yet): "
                                               "add it with loc3r-scene add NAME VIDEO")
