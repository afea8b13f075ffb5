"""The server's scenes: several videos' KV resident under a memory budget (LRU, spilled to
the scene store), ``loc3r.scene`` by name, ``POST /v1/locate`` (poses, no answer)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from serve_helpers import chat_body, metric

from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.pipeline import Pipeline
from loc3r.runtime.scenes import NamedScene, write_scenes
from loc3r.serve.server import build_server, running
from loc3r.serve.settings import ServeSettings

FRAMES = 3
ROOMS = ("a.mp4", "b.mp4", "c.mp4", "d.mp4")
SITUATIONS = ["I am by the sink, the fridge on my left.", "Standing at the door"]


def test_scenes_stay_resident_under_the_budget_and_locate_needs_no_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOC3R_HOME", str(tmp_path / "home"))
    media = tmp_path / "media"
    for number, name in enumerate(ROOMS):
        write_demo_video(media / name, num_frames=10 + number, width=96 + 16 * number, height=64)
    write_scenes({"kitchen": NamedScene(str(media / "b.mp4"), FRAMES)})
    pipeline = Pipeline.from_pretrained("tiny", cache_dir=tmp_path / "cache")
    scene_bytes = pipeline.open(media / "a.mp4", FRAMES).scene().nbytes
    pipeline.forget_video()
    settings = ServeSettings(media_dir=media, upload_dir=tmp_path / "uploads", max_frames=FRAMES, scene_memory_bytes=int(2.5 * scene_bytes))
    with running(build_server(pipeline, settings)) as url:
        def ask(room: str, **loc3r: object) -> dict:
            response = httpx.post(f"{url}/v1/chat/completions", json=chat_body(room, "Where am I?", max_tokens=3, loc3r={"frames": FRAMES, **loc3r}), timeout=120)
            assert response.status_code == 200, response.text
            return response.json()

        first = {room: ask(room) for room in ROOMS}  # a, b, c, d opened: a's KV is spilled when d's arrives
        health = httpx.get(f"{url}/health", timeout=10).json()["scenes"]
        assert health["memory_budget_bytes"] == int(2.5 * scene_bytes) and health["memory_bytes"] <= health["memory_budget_bytes"]
        assert [Path(source).name for source in health["resident"]] == ["b.mp4", "c.mp4"]
        # the resident video's KV is held once another takes the cache: memory holds 2 of d, c, a, b in LRU order
        again = [(room, ask(room)) for room in ("c.mp4", "a.mp4", "b.mp4", "a.mp4")]
        sources = [(room, answer["loc3r"]["server"]["scene_source"]) for room, answer in again]
        assert sources == [("c.mp4", "memory"), ("a.mp4", "store"), ("b.mp4", "store"), ("a.mp4", "memory")]
        for room, answer in again:
            assert answer["choices"][0]["message"]["content"] == first[room]["choices"][0]["message"]["content"]
            assert answer["loc3r"]["position"]["x"] == pytest.approx(first[room]["loc3r"]["position"]["x"], abs=1e-5)
        figures = httpx.get(f"{url}/metrics", timeout=10).text
        assert metric(figures, "loc3r_scene_memory_budget_bytes") == int(2.5 * scene_bytes)
        assert 0 < metric(figures, "loc3r_scene_memory_bytes") <= int(2.5 * scene_bytes)
        assert 'loc3r_scene_reclaims_total{source="memory"} 2.0' in figures

        body = {"model": "loc3r", "messages": [{"role": "user", "content": "Where am I?"}], "max_tokens": 3,
                "loc3r": {"scene": "kitchen", "situation": SITUATIONS[0]}}
        by_name = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        located = httpx.post(f"{url}/v1/locate", json={"scene": "kitchen", "situations": SITUATIONS}, timeout=120)
        assert located.status_code == 200, located.text
        poses = located.json()["poses"]
        assert [p["situation"] for p in poses] == SITUATIONS
        assert poses[0]["position"]["x"] == pytest.approx(by_name["loc3r"]["position"]["x"], abs=1e-5)
        assert poses[0]["orientation"]["theta_rad"] == pytest.approx(by_name["loc3r"]["orientation"]["theta_rad"], abs=1e-5)
        by_url = httpx.post(f"{url}/v1/locate", json={"scene": "d.mp4", "situations": [""], "frames": FRAMES}, timeout=120).json()
        assert by_url["server"]["scene_source"] == "store"  # d's KV had been spilled
        for axis in ("x", "y", "sigma"):
            assert by_url["poses"][0]["position"][axis] == pytest.approx(first["d.mp4"]["loc3r"]["position"][axis], abs=1e-5)
        unknown = httpx.post(f"{url}/v1/locate", json={"scene": "nowhere", "situations": ["x"]}, timeout=30)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "video_not_found"
        listing = httpx.get(f"{url}/v1/scenes", timeout=10).json()["data"]
        assert [s["id"] for s in listing] == ["kitchen"]
