"""loc3r-eval --ray on a local Ray cluster (2 CPUs, tiny model): the single-process
metrics, and a killed worker's video redone. Slow (a Ray cluster and one model per worker):
run with ``pytest -m slow tests/test_eval_ray.py``."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from loc3r.eval import cli as eval_cli
from loc3r.runtime.demo_video import write_demo_video

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'loc3r[ray]'")
pytestmark = pytest.mark.slow
OPTIONS = ["--model", "tiny", "--frames", "2", "--max-new-tokens", "4"]
VIDEOS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_data")
    lines = []
    for v in range(VIDEOS):
        write_demo_video(root / f"v{v}.mp4", num_frames=4 + v, width=64, height=48)
        lines.append({"id": f"{v}a", "video": f"v{v}.mp4", "question": "Where am I?", "position": {"x": v * 0.3, "y": -0.2}, "orientation": 0.5})
        lines.append(
            {"id": f"{v}b", "video": f"v{v}.mp4", "question": "What is on the table?", "answer": "a cup", "position": {"x": 0.1, "y": v * 0.2}}
        )
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single(data: Path) -> dict:
    out = data.parent / "single"
    assert eval_cli.main([str(data), "--out", str(out), *OPTIONS]) == 0
    return read(out)


@pytest.fixture(scope="module")
def cluster() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def read(out: Path) -> dict:
    predictions = {}
    for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        assert record["key"] not in predictions  # no item written twice
        predictions[record["key"]] = record
    return {"predictions": predictions, "summary": json.loads((out / "summary.json").read_text())}


def assert_same_results(a: dict, b: dict) -> None:
    assert a["predictions"].keys() == b["predictions"].keys()
    for key, record in a["predictions"].items():
        other = b["predictions"][key]
        assert record["answer"] == other["answer"], key
        assert record["pose"] == pytest.approx(other["pose"], abs=1e-5), key  # another process: float rounding at most
    for name, value in a["summary"]["metrics"].items():
        other = b["summary"]["metrics"][name]
        assert other is None if value is None else value == pytest.approx(other, rel=1e-6, abs=1e-5, nan_ok=True), name
    assert a["summary"]["counts"] == b["summary"]["counts"]


def test_ray_gives_the_single_process_results(data: Path, single: dict, cluster: None) -> None:
    out = data.parent / "ray"
    assert eval_cli.main([str(data), "--out", str(out), "--ray", *OPTIONS]) == 0
    assert_same_results(single, read(out))


def test_a_killed_worker_is_replaced_and_its_video_redone(data: Path, single: dict, cluster: None, capfd: pytest.CaptureFixture[str]) -> None:
    out = data.parent / "ray_killed"
    codes: list[int] = []
    run = threading.Thread(target=lambda: codes.append(eval_cli.main([str(data), "--out", str(out), "--ray", *OPTIONS])))
    run.start()
    log = out / "predictions.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and log.stat().st_size):  # the workers are up and answering
        assert run.is_alive() and time.monotonic() < deadline, "no prediction was written"
        time.sleep(0.05)
    victim = sorted(ray.util.list_named_actors())[0]
    ray.kill(ray.get_actor(victim))
    run.join(timeout=300)
    assert codes == [0]
    assert "a Ray worker died while on" in capfd.readouterr().err
    assert_same_results(single, read(out))
