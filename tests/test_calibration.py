"""Calibrated confidence: the fits on synthetic data where the error grows with sigma (the
tiny model's weights are random, so only the mechanism can be tested), the file's round trip
and refusals, loc3r-eval --calibrate, and the confidence in loc3r-run and the server."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import chat_body, tiny_pipeline

from loc3r.errors import InputError, ModelError
from loc3r.eval import cli as eval_cli
from loc3r.eval.calibration import (
    calibrate,
    expected_calibration_error,
    fit_isotonic,
    fit_logistic,
    held_out_predictions,
)
from loc3r.models.tiny import resolve_model
from loc3r.runtime.cli import EXIT_NOT_LOCALIZED
from loc3r.runtime.cli import main as run_main
from loc3r.runtime.confidence import (
    CALIBRATION_FILE,
    RADII_M,
    check_min_confidence,
    find_calibration,
    load_calibration,
    not_localized_reason,
    save_calibration,
)
from loc3r.runtime.demo_video import write_demo_video

FRAMES = 2
ECE_BOUND = 0.05  # held-out ECE on 2000 synthetic items (measured: 0.017-0.041, see docs/user-guide.md)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """sigma log-uniform in [0.1, 2] m; the error Rayleigh with scale sigma (2D Gaussian noise),
    so P(error <= r) = 1 - exp(-r^2 / (2 sigma^2))."""
    rng = np.random.default_rng(seed)
    sigma = np.exp(rng.uniform(np.log(0.1), np.log(2.0), n))
    return sigma, sigma * np.sqrt(-2 * np.log(rng.uniform(size=n)))


def true_p(sigma: np.ndarray, radius: float) -> np.ndarray:
    return 1 - np.exp(-(radius**2) / (2 * sigma**2))


# -- the fits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fit", [fit_logistic, fit_isotonic])
@pytest.mark.parametrize("radius", RADII_M)
def test_fit_is_monotone_and_calibrated_on_held_out_data(fit, radius: float) -> None:  # noqa: ANN001
    sigma, err = synthetic(2000, seed=1)
    hit = err <= radius
    curve = fit(sigma, hit)
    grid = np.exp(np.linspace(np.log(0.02), np.log(5), 200))
    assert np.all(np.diff(curve(grid)) <= 1e-12)  # never more confident for a larger sigma
    assert expected_calibration_error(held_out_predictions(sigma, hit, curve.method), hit) < ECE_BOUND
    test_sigma, test_err = synthetic(20000, seed=2)  # fresh items: the fit generalises
    assert expected_calibration_error(curve(test_sigma), test_err <= radius) < ECE_BOUND
    assert np.mean(np.abs(curve(test_sigma) - true_p(test_sigma, radius))) < 0.04


def test_logistic_beats_isotonic_with_few_items() -> None:
    """Why logistic is the default: with 100 items its curve is nearer the truth (20 data sets)."""
    gaps = {"logistic": [], "isotonic": []}
    for seed in range(20):
        sigma, err = synthetic(100, seed)
        test_sigma = synthetic(5000, 100 + seed)[0]
        for name, fit in (("logistic", fit_logistic), ("isotonic", fit_isotonic)):
            gaps[name].append(np.mean(np.abs(fit(sigma, err <= 1.0)(test_sigma) - true_p(test_sigma, 1.0))))
    assert np.mean(gaps["logistic"]) < 0.9 * np.mean(gaps["isotonic"])


def test_uninformative_sigma_gives_the_base_rate() -> None:
    rng = np.random.default_rng(3)
    sigma = rng.uniform(0.5, 1.5, 400)
    hit = rng.uniform(size=400) < 0.3  # independent of sigma
    curve = fit_logistic(sigma, hit)
    assert curve.params["b"] <= 0
    assert curve(np.array([0.5, 1.5])) == pytest.approx([hit.mean()] * 2, abs=0.06)


def test_isotonic_pools_adjacent_violators_by_hand() -> None:
    curve = fit_isotonic([1.0, 2.0, 3.0, 4.0], [1, 0, 1, 0])
    assert curve.params["p"] == [1.0, 0.5, 0.0]
    assert curve.params["log_sigma"] == pytest.approx([0.0, (np.log(2) + np.log(3)) / 2, np.log(4)])
    assert curve(np.array([1.0, 4.0, 10.0])) == pytest.approx([1.0, 0.0, 0.0])


def test_ece_by_hand() -> None:
    # bin [0.1, 0.2): mean p 0.1, hit rate 0.5; bin [0.9, 1]: mean p 0.9, hit rate 1
    assert expected_calibration_error([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]) == pytest.approx((2 * 0.4 + 2 * 0.1) / 4)


def test_too_few_items_is_one_line() -> None:
    with pytest.raises(InputError, match="only 3 items have a ground-truth position"):
        calibrate(np.ones(3), np.ones(3), "logistic", "c" * 64, False, "x.jsonl")


# -- the file -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["logistic", "isotonic"])
def test_round_trip_and_a_foreign_bundle_is_refused(tmp_path: Path, method: str) -> None:
    sigma, err = synthetic(500, seed=4)
    calibration, _ = calibrate(sigma, err, method, "a" * 64, True, "synthetic.jsonl")
    path = save_calibration(calibration, tmp_path / CALIBRATION_FILE)
    loaded = find_calibration(tmp_path, "a" * 64)
    for s in (0.05, 0.3, 0.9, 3.0):
        assert loaded.confidence(s) == calibration.confidence(s)
        assert loaded.confidence(s)["within_0.5m"] <= loaded.confidence(s)["within_1.0m"]
    assert loaded.confidence(float("nan")) is None
    assert "RANDOM-weights" in loaded.note
    with pytest.raises(ModelError) as refused:
        load_calibration(path, "b" * 64)
    assert str(refused.value) == (
        f"calibration {path} was fit for bundle checksum aaaaaaaaaaaa, not this bundle's bbbbbbbbbbbb: "
        "delete it or refit it with loc3r-eval DATA.jsonl --calibrate --model BUNDLE"
    )
    assert find_calibration(tmp_path / "elsewhere", "a" * 64) is None  # no calibration: no confidence


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="other"), "is not a loc3r calibration"),
        (lambda d: d["curves"]["within_1.0m"].update(b=0.5), "within_1.0m is not a valid calibration curve"),
        (lambda d: d["curves"].pop("within_0.5m"), "does not hold one curve per radius"),
    ],
)
def test_a_damaged_file_is_one_line(tmp_path: Path, change, message: str) -> None:  # noqa: ANN001
    sigma, err = synthetic(200, seed=5)
    path = save_calibration(calibrate(sigma, err, "logistic", "a" * 64, False, "s.jsonl")[0], tmp_path / "c.json")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message):
        load_calibration(path, "a" * 64)


# -- loc3r-eval --calibrate, loc3r-run, the server (the tiny model: random weights) ----------------

SITUATIONS = [f"I stand by the {thing}, facing the {side}." for thing in ("sink", "door", "bed", "desk", "lamp")
              for side in ("window", "wall", "shelf", "stairs")]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the tiny bundle calibrated by loc3r-eval on synthetic labels: each item's true
    position is put at a distance that grows with the rank of its predicted sigma."""
    root = tmp_path_factory.mktemp("calibrated")
    bundle = root / "bundle"
    shutil.copytree(resolve_model("tiny"), bundle)
    video = write_demo_video(root / "room.mp4", num_frames=4, width=64, height=48)
    items = [{"id": f"s{i}", "video": video.name, "question": "Where am I?", "situation": s, "position": {"x": 0, "y": 0}}
             for i, s in enumerate(SITUATIONS)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    options = ["--model", str(bundle), "--frames", str(FRAMES), "--max-new-tokens", "1", "--out", str(root / "out")]
    assert eval_cli.main([str(data), *options]) == 0
    poses = {json.loads(line)["key"]: json.loads(line)["pose"] for line in (root / "out" / "predictions.jsonl").read_text().splitlines()}
    order = sorted(poses, key=lambda key: poses[key]["sigma"])
    angles = np.random.default_rng(0).uniform(0, 2 * np.pi, len(items))
    for item, angle in zip(items, angles):
        distance = 0.1 + 2.0 * order.index(item["id"]) / (len(items) - 1)  # 0.1 m at the lowest sigma, 2.1 m at the highest
        pose = poses[item["id"]]
        item["position"] = {"x": pose["x"] + distance * np.cos(angle), "y": pose["y"] + distance * np.sin(angle)}
    data.write_text("".join(json.dumps(item) + "\n" for item in items))  # same questions: the predictions are reused
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert eval_cli.main([str(data), *options, "--calibrate"]) == 0
    assert "(RANDOM weights: the mechanism only, sigma means nothing)" in err.getvalue()
    summary = json.loads((root / "out" / "summary.json").read_text())
    return {"root": root, "bundle": bundle, "video": video, "poses": poses, "order": order, "items": items, "summary": summary}


def test_eval_calibrate_writes_into_the_bundle_and_reports_reliability(calibrated: dict) -> None:
    report, bundle = calibrated["summary"]["calibration"], calibrated["bundle"]
    assert report["file"] == str(bundle / CALIBRATION_FILE) and report["items"] == len(SITUATIONS)
    assert report["radii"]["within_0.5m"]["hit_rate"] == pytest.approx(4 / 20)  # distances 0.1 .. 0.1 + 2 * 3/19
    for entry in report["radii"].values():
        assert set(entry["ece"]) == {"logistic", "isotonic"}
        assert all(0 <= v["held_out"] <= 1 and 0 <= v["in_sample"] <= 1 for v in entry["ece"].values())
    assert Path(report["reliability_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RANDOM-weights" in report["note"]
    markdown = (calibrated["root"] / "out" / "summary.md").read_text()
    assert "## Calibration: logistic on 20 items" in markdown and "| r = 1.0m |" in markdown
    stored = json.loads((bundle / CALIBRATION_FILE).read_text())
    assert stored["random_weights"] is True and stored["source"] == "data.jsonl"
    # the mechanism: confidence falls as sigma grows
    calibration = load_calibration(bundle / CALIBRATION_FILE, stored["bundle_checksum"])
    sigmas = [calibrated["poses"][key]["sigma"] for key in calibrated["order"]]
    within = [calibration.confidence(s)["within_1.0m"] for s in sigmas]
    assert within == sorted(within, reverse=True) and within[0] > 0.8 and within[-1] < 0.2


def run_json(calibrated: dict, capsys: pytest.CaptureFixture[str], situation: str, *extra: str) -> tuple[int, dict, str]:
    argv = [str(calibrated["video"]), "Where am I?", "--model", str(calibrated["bundle"]), "--frames", str(FRAMES),
            "--max-new-tokens", "1", "--situation", situation, "--no-cache", "--json", *extra]
    code = run_main(argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out else {}, captured.err


def test_run_reports_the_confidence_of_the_bundles_calibration(calibrated: dict, capsys: pytest.CaptureFixture[str]) -> None:
    key = calibrated["order"][0]
    item = next(i for i in calibrated["items"] if i["id"] == key)
    code, out, _ = run_json(calibrated, capsys, item["situation"])
    assert code == 0
    calibration = load_calibration(calibrated["bundle"] / CALIBRATION_FILE, out["model"]["checksum"])
    assert out["position"]["sigma"] == pytest.approx(calibrated["poses"][key]["sigma"], abs=1e-6)
    assert out["position"]["confidence"] == pytest.approx(calibration.confidence(out["position"]["sigma"]), abs=1e-5)
    assert out["confidence_note"].startswith("calibration of a RANDOM-weights model")
    assert out["model"]["calibration"]["file"] == str(calibrated["bundle"] / CALIBRATION_FILE)


def test_min_confidence_refuses_a_pose_below_it(calibrated: dict, capsys: pytest.CaptureFixture[str]) -> None:
    by_id = {i["id"]: i for i in calibrated["items"]}
    sure, unsure = by_id[calibrated["order"][0]]["situation"], by_id[calibrated["order"][-1]]["situation"]
    code, out, err = run_json(calibrated, capsys, unsure, "--min-confidence", "0.5")
    assert code == EXIT_NOT_LOCALIZED
    assert out["localized"] is False and out["position"] is None and out["orientation"] is None
    assert out["not_localized"]["pose"]["position"]["confidence"]["within_1.0m"] < 0.5
    assert "of an error <= 1.0 m is below the minimum 0.5" in out["not_localized"]["reason"]
    assert err == "loc3r-run: 1 pose(s) below --min-confidence 0.5: not localized\n"
    code, out, _ = run_json(calibrated, capsys, sure, "--min-confidence", "0.5")
    assert code == 0 and out["localized"] is True and out["position"]["confidence"]["within_1.0m"] >= 0.5


def test_min_confidence_without_a_calibration_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    video = write_demo_video(tmp_path / "v.mp4", num_frames=3, width=48, height=32)
    assert run_main([str(video), "Where?", "--frames", "2", "--min-confidence", "0.7"]) == 2
    err = capsys.readouterr().err
    assert err == ("loc3r-run: error: --min-confidence needs a calibration, and this bundle has none: fit one with "
                   "loc3r-eval DATA.jsonl --calibrate --model BUNDLE, or pass --calibration FILE\n")
    with pytest.raises(SystemExit) as usage:
        run_main([str(video), "Where?", "--min-confidence", "1.5"])
    assert usage.value.code == 2 and "1.5 is not a probability from 0 to 1" in capsys.readouterr().err


def test_a_foreign_calibration_is_refused_in_one_line(calibrated: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads((calibrated["bundle"] / CALIBRATION_FILE).read_text())
    data["bundle_checksum"] = "f" * 64
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(data))
    code, _, err = run_json(calibrated, capsys, SITUATIONS[0], "--calibration", str(foreign))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"loc3r-run: error: calibration {foreign} was fit for bundle checksum ffffffffffff, not this bundle's ")


def test_server_reports_confidence_and_honours_min_confidence(calibrated: dict, tmp_path: Path) -> None:
    from loc3r.runtime.pipeline import Pipeline
    from loc3r.serve.server import build_server, running
    from loc3r.serve.settings import ServeSettings

    by_id = {i["id"]: i for i in calibrated["items"]}
    unsure = by_id[calibrated["order"][-1]]["situation"]
    media = calibrated["video"].parent
    settings = ServeSettings(media_dir=media, upload_dir=tmp_path / "uploads")
    body = chat_body(calibrated["video"].name, "Where am I?", max_tokens=1)
    with running(build_server(Pipeline.from_pretrained(calibrated["bundle"]), settings)) as url:
        asked = {"situation": unsure, "frames": FRAMES}
        plain = httpx.post(f"{url}/v1/chat/completions", json={**body, "loc3r": asked}, timeout=120).json()["loc3r"]
        assert plain["position"]["confidence"]["within_1.0m"] < 0.5 and "localized" not in plain
        refused = httpx.post(f"{url}/v1/chat/completions", json={**body, "loc3r": {**asked, "min_confidence": 0.5}}, timeout=120)
        answer = refused.json()["loc3r"]
        assert refused.status_code == 200 and answer["localized"] is False and answer["position"] is None
        assert answer["not_localized"]["pose"]["position"] == plain["position"]
        assert httpx.get(f"{url}/health", timeout=10).json()["model"]["calibration"]["method"] == "logistic"
        sure = by_id[calibrated["order"][0]]["situation"]
        located = httpx.post(f"{url}/v1/locate", json={"scene": calibrated["video"].name, "situations": [sure, unsure], "frames": FRAMES,
                                                       "min_confidence": 0.5}, timeout=120).json()["poses"]
        assert located[0]["localized"] is True and located[0]["position"]["confidence"]["within_1.0m"] >= 0.5
        assert located[1]["localized"] is False and located[1]["position"] is None  # the same fields as an answer's
        withheld = located[1]["not_localized"]["pose"]["position"]
        for axis in ("x", "y", "sigma"):
            assert withheld[axis] == pytest.approx(plain["position"][axis], abs=1e-5)
        assert withheld["confidence"] == pytest.approx(plain["position"]["confidence"], abs=1e-4)
        assert located[1]["confidence_note"] == plain["confidence_note"]
    with running(build_server(tiny_pipeline(), ServeSettings(media_dir=media, upload_dir=tmp_path / "u2"))) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json={**body, "loc3r": {"min_confidence": 0.5}}, timeout=120)
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "no_calibration" and error["param"] == "loc3r.min_confidence"
        assert error["message"].startswith("loc3r.min_confidence needs a calibration, and this bundle has none")


def test_calibrate_refuses_predictions_of_another_bundle(calibrated: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(calibrated["root"] / "out", out)
    made_by = json.loads((out / "run.json").read_text())["model"]["checksum"]
    config = calibrated["bundle"] / "config.json"
    original = config.read_bytes()
    config.write_bytes(original + b"\n")  # the bundle re-made in place since the predictions: another checksum
    argv = [str(calibrated["root"] / "data.jsonl"), "--model", str(calibrated["bundle"]), "--frames", str(FRAMES),
            "--max-new-tokens", "1", "--out", str(out), "--calibrate", "--calibration-out", str(tmp_path / "c.json")]
    try:
        assert eval_cli.main(argv) == 2
    finally:
        config.write_bytes(original)
    err = capsys.readouterr().err
    assert err.startswith(f"loc3r-eval: error: the predictions in {out} were made by bundle checksum {made_by[:12]}, --model is ")
    assert err.count("\n") == 1 and not (tmp_path / "c.json").exists()


def test_text_output_prints_the_confidence_and_the_verdict(calibrated: dict, capsys: pytest.CaptureFixture[str]) -> None:
    by_id = {i["id"]: i for i in calibrated["items"]}
    unsure = by_id[calibrated["order"][-1]]["situation"]
    argv = [str(calibrated["video"]), "Where am I?", "--frames", str(FRAMES), "--max-new-tokens", "1", "--no-cache", "--situation", unsure]
    assert run_main([*argv, "--model", str(calibrated["bundle"]), "--min-confidence", "0.5"]) == EXIT_NOT_LOCALIZED
    lines = capsys.readouterr().out.splitlines()
    confidence = next(line for line in lines if line.startswith("confidence: "))
    assert re.fullmatch(r"confidence: P\(error <= 0\.5 m\) = 0\.\d{3}, P\(error <= 1\.0 m\) = 0\.\d{3} "
                        r"\(calibration of a RANDOM-weights model: .*logistic calibration fit on 20 items of data\.jsonl\)", confidence)
    assert any(re.fullmatch(r"NOT LOCALIZED: confidence 0\.\d{3} of an error <= 1\.0 m is below the minimum 0\.5", line) for line in lines)
    assert run_main([*argv, "--model", "tiny"]) == 0  # the built-in bundle has no calibration
    lines = capsys.readouterr().out.splitlines()
    assert "confidence: none (no calibration for this bundle: confidence is null (fit one with loc3r-eval DATA.jsonl --calibrate))" in lines
    assert not any(line.startswith("NOT LOCALIZED") for line in lines)


def test_verdict_at_either_radius() -> None:
    confidence = {"within_0.5m": 0.4, "within_1.0m": 0.9}
    assert not_localized_reason(confidence, 0.8, 1.0) is None
    assert not_localized_reason(confidence, 0.8, 0.5) == "confidence 0.400 of an error <= 0.5 m is below the minimum 0.8"
    assert not_localized_reason(None, 0.1, 1.0).startswith("the pose is not finite")
    with pytest.raises(InputError, match="confidence radius 2.0 m is not calibrated"):
        check_min_confidence(0.5, 2.0, None, "--min-confidence")


def test_pose_only_reports_confidence_and_the_verdict_as_answers_do(calibrated: dict, capsys: pytest.CaptureFixture[str]) -> None:
    by_id = {i["id"]: i for i in calibrated["items"]}
    sure, unsure = by_id[calibrated["order"][0]]["situation"], by_id[calibrated["order"][-1]]["situation"]
    argv = [str(calibrated["video"]), sure, unsure, "--pose-only", "--model", str(calibrated["bundle"]), "--frames", str(FRAMES),
            "--no-cache", "--min-confidence", "0.5"]
    assert run_main([*argv, "--json"]) == EXIT_NOT_LOCALIZED
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["localized"] is True and first["position"]["confidence"]["within_1.0m"] >= 0.5
    assert first["position"]["sigma"] == pytest.approx(calibrated["poses"][calibrated["order"][0]]["sigma"], abs=1e-5)
    assert second["localized"] is False and second["position"] is None and second["orientation"] is None
    assert second["not_localized"]["reason"].endswith("is below the minimum 0.5")
    assert second["not_localized"]["pose"]["position"]["confidence"]["within_1.0m"] < 0.5
    assert first["confidence_note"].startswith("calibration of a RANDOM-weights model")
    assert run_main(argv) == EXIT_NOT_LOCALIZED
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("confidence: P(error <= 0.5 m) = ") for line in lines) == 2
    assert sum(line.startswith("NOT LOCALIZED: confidence ") for line in lines) == 1


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("missing/c.json", "the folder {tmp}/missing does not exist: create it, or pass a path in an existing folder"),
        ("c.txt", "does not end in .json: name the file to write like out.json"),
        ("DATA.jsonl", "does not end in .json"),
    ],
)
def test_a_bad_calibration_out_is_refused_before_any_item_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, message: str) -> None:
    (tmp_path / "a.mp4").write_bytes(b"")
    data = tmp_path / "DATA.jsonl"
    data.write_text(json.dumps({"video": "a.mp4", "question": "Where?", "position": {"x": 0, "y": 0}}) + "\n")
    argv = [str(data), "--out", str(tmp_path / "out"), "--calibrate", "--calibration-out", str(tmp_path / target)]
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loc3r-eval: error: --calibration-out ") and message.format(tmp=tmp_path) in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_confidence_and_fitting_import_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, loc3r.runtime.confidence, loc3r.eval.calibration; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
