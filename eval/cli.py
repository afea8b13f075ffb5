"""``loc3r-eval DATA.jsonl [options]``: the paper's metrics on a dataset, resumable.

Items on the same video run one after another, so the pipeline reuses its encoding and the
video-prefix KV cache. Each answered item is appended (and flushed) to ``OUT/predictions.jsonl``;
a rerun with the same ``--out`` continues where an interrupted one stopped. Scores are computed
from the dataset and the predictions at the end, into ``OUT/summary.json`` and ``OUT/summary.md``.
``loc3r-eval --compare A.json B.json`` prints the metric deltas B - A. ``--calibrate`` also fits
sigma -> P(position error <= 0.5 m / 1.0 m) on the items with a position (``loc3r.eval.calibration``),
writes it into the bundle (``calibration.json``, stamped with the bundle checksum) and reports its
reliability (ECE in ``summary``, ``OUT/reliability.png``).

``OUT`` is an output folder under loc3r's rule (``loc3r.owned_folder``): its marker records
every file written with its size and SHA-256 (``predictions.jsonl`` after every line), so a
file loc3r did not write is never overwritten, a symlinked ``--out`` is refused, and a resume
reads exactly the predictions loc3r recorded (an edited or forged line is refused).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from loc3r.eval import metrics
from loc3r.eval.dataset import Item, format_help, is_number, load_dataset, parse_json_line
from loc3r.cli_support import ArgumentParser, positive_int, run_cli
from loc3r.errors import InputError, Loc3rError
from loc3r.fileio import check_output_file, claim_entries, finite_json
from loc3r.owned_folder import OwnedFolder, open_owned_folder
from loc3r.progress import announce_loading

PROG = "loc3r-eval"
PREDICTIONS = "predictions.jsonl"
RELIABILITY_PNG = "reliability.png"
EVAL_KIND = "evaluation"  # the output-folder kind (loc3r.fileio) of --out
RUN = "run.json"

# (key in summary["metrics"], label, "rate" (shown in %) or "num", key in summary["counts"])
METRIC_ROWS = [
    ("acc@0.5m", "Acc@0.5m", "rate", "position"),
    ("acc@1.0m", "Acc@1.0m", "rate", "position"),
    ("pos_err_mean_m", "position error, mean (m)", "num", "position"),
    ("pos_err_median_m", "position error, median (m)", "num", "position"),
    ("acc@15deg", "Acc@15°", "rate", "orientation"),
    ("acc@30deg", "Acc@30°", "rate", "orientation"),
    ("ang_err_mean_deg", "angle error, mean (°)", "num", "orientation"),
    ("ang_err_median_deg", "angle error, median (°)", "num", "orientation"),
    ("em", "EM", "rate", "open"),
    ("em_r", "EM-R (refined)", "rate", "open"),
    ("choice_acc", "multiple-choice accuracy", "rate", "choice"),
    ("mra", "MRA (numeric)", "rate", "numeric"),
    ("sigma_spearman", "Spearman(sigma, position error)", "num", "position"),
    ("sigma_auroc@1.0m", "AUROC of sigma for error > 1.0 m", "num", "position"),
    ("acc@1.0m_keep50", "Acc@1.0m, 50% lowest sigma", "rate", "position"),
    ("acc@1.0m_keep80", "Acc@1.0m, 80% lowest sigma", "rate", "position"),
    ("acc@1.0m_keep100", "Acc@1.0m, 100% lowest sigma", "rate", "position"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Run Loc3R-VLM over a JSONL dataset and report localization (Acc@0.5m/1.0m, "
        "Acc@15/30deg), QA (EM, EM-R, multiple choice, MRA) and whether sigma tracks the error.",
        epilog=format_help(),
    )
    parser.add_argument("data", nargs="?", help="JSONL dataset: one {video, question, ...} object per line")
    parser.add_argument("--model", default="tiny", help="bundle folder, or 'tiny' (built-in, random weights)")
    parser.add_argument("--backend", default="torch", choices=["torch"], help="inference backend")
    parser.add_argument("--frames", type=positive_int, default=None, help="frames to sample per video (default: the model's)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--out", default=None, help="output folder (default: ./<DATA name>-eval); reusing it resumes")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N items")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="run on a Ray cluster (ADDRESS, or a local one); needs loc3r[ray]")
    parser.add_argument("--ray-workers", type=positive_int, default=None, help="actors with --ray (default: one per GPU, else per CPU)")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit sigma -> P(position error <= 0.5 / 1.0 m) on the items with a position; write it into the bundle")
    parser.add_argument("--calibrate-method", default="logistic", choices=["logistic", "isotonic"],
                        help="logistic on log sigma (default: smooth, needs few items) or isotonic (no shape assumed, needs ~1000+)")
    parser.add_argument("--calibration-out", metavar="FILE", help="where --calibrate writes (default: BUNDLE/calibration.json)")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print metric deltas B - A of two summaries")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.data is None) == (args.compare is None):
        parser.error("pass a dataset DATA.jsonl, or --compare A.json B.json")
    if args.calibration_out and not args.calibrate:
        parser.error("--calibration-out needs --calibrate")

    def body() -> int:
        if args.compare:
            print(compare_markdown(read_summary(args.compare[0]), read_summary(args.compare[1])), end="")
            return 0
        summary = evaluate(args)
        print(summary_markdown(summary), end="")
        return 0

    return run_cli(PROG, body, args.debug)


# -- running --------------------------------------------------------------------------------


def load_pipeline(model: str, backend: str) -> Any:
    """The answering pipeline (imported here: loading it is the slow part, said on stderr)."""
    loaded = announce_loading(PROG, f"model {model} ({backend} backend)")
    from loc3r.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_pretrained(model, backend=backend, calibration=False)  # sigma only: no stale calibration in the way
    loaded()
    return pipeline


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Answer every item not yet in OUT/predictions.jsonl, then write and return the summary."""
    data = Path(args.data)
    items = load_dataset(data, args.limit)
    if args.calibration_out:  # before any item is answered
        check_calibration_out(Path(args.calibration_out), data)
    folder = open_owned_folder(Path(args.out) if args.out else Path(f"{data.stem}-eval"), EVAL_KIND, logs=(PREDICTIONS,), prog=PROG)
    out = folder.path
    settings = {"model": str(args.model), "backend": args.backend, "frames": args.frames, "max_new_tokens": args.max_new_tokens}
    run = open_run(folder, settings)
    records = read_predictions(out / PREDICTIONS, items, partial=bool(args.limit))
    todo = [item for item in group_by_video(items) if item.key not in records]
    if records and todo:
        print(f"{PROG}: resuming: {len(items) - len(todo)} of {len(items)} items already in {out / PREDICTIONS}", file=sys.stderr)
    if todo and args.ray:
        from loc3r.eval.ray_runner import answer_items_on_ray

        run = answer_items_on_ray(todo, args, folder, run, records)
    elif todo:
        run = answer_items(todo, args, folder, run, records)
    summary = build_summary(data, items, records, run)
    if args.calibrate:
        summary["calibration"] = fit_calibration(args, data, items, records, run, folder)
    folder.write_text("summary.json", finite_json(summary, indent=2) + "\n")
    folder.write_text("summary.md", summary_markdown(summary))
    print(f"{PROG}: wrote {out / 'summary.json'} and {out / 'summary.md'}", file=sys.stderr)
    return summary


def check_calibration_out(path: Path, data: Path) -> None:
    """A ``.json`` file in an existing folder, not the dataset."""
    check_output_file(path, "--calibration-out", (".json",), inputs=[data])
    if not path.parent.is_dir():
        raise InputError(f"--calibration-out {path}: the folder {path.parent} does not exist", "create it, or pass a path in an existing folder")


def fit_calibration(args: argparse.Namespace, data: Path, items: Sequence[Item], records: dict[str, dict[str, Any]],
                    run: dict[str, Any], folder: OwnedFolder) -> dict[str, Any]:
    """Fit the calibration of the bundle that made the predictions, write it and the reliability
    diagram, and return the report that goes into the summary."""
    from loc3r.eval.calibration import calibrate, labelled_errors, plot_reliability
    from loc3r.models.bundle import bundle_checksum
    from loc3r.models.tiny import resolve_model
    from loc3r.runtime.confidence import CALIBRATION_FILE, save_calibration

    bundle = resolve_model(args.model)
    checksum = bundle_checksum(bundle)
    made_by = (run.get("model") or {}).get("checksum")
    if made_by != checksum:
        raise InputError(f"the predictions in {folder.path} were made by bundle checksum {str(made_by)[:12]}, --model is {checksum[:12]}",
                         "pass the --model that made them, or another --out")
    sigma, errors, skipped = labelled_errors(items, records)
    random_weights = bool(run["model"].get("random_weights"))
    calibration, report = calibrate(sigma, errors, args.calibrate_method, checksum, random_weights, data.name)
    target = save_calibration(calibration, Path(args.calibration_out) if args.calibration_out else bundle / CALIBRATION_FILE)
    if target.resolve() == (bundle / CALIBRATION_FILE).resolve():
        claim_entries(bundle, [CALIBRATION_FILE])  # loc3r's own file: re-converting the bundle may replace it
    title = f"{PROG} --calibrate: {calibration.method} on {calibration.items} items of {data.name}"
    folder.check_own(RELIABILITY_PNG)
    plot = plot_reliability(calibration, sigma, errors, folder.path / RELIABILITY_PNG, title + (" (RANDOM weights)" if random_weights else ""))
    folder.claim(RELIABILITY_PNG)
    caveat = " (RANDOM weights: the mechanism only, sigma means nothing)" if random_weights else ""
    print(f"{PROG}: wrote the calibration {target} and the reliability diagram {plot}{caveat}", file=sys.stderr)
    return {**report, "skipped_non_finite": skipped, "file": str(target), "reliability_png": str(plot), "note": calibration.note}


def group_by_video(items: Sequence[Item]) -> list[Item]:
    """Items reordered so that each video's questions are consecutive (first-seen video order)."""
    first_seen: dict[Path, int] = {}
    for item in items:
        first_seen.setdefault(item.video, len(first_seen))
    return sorted(items, key=lambda item: first_seen[item.video])


def answer_items(todo: list[Item], args: argparse.Namespace, folder: OwnedFolder, run: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ask the pipeline each item, appending every prediction to the log as soon as it exists."""
    from loc3r.runtime.generate import SamplingConfig

    pipeline = load_pipeline(args.model, args.backend)
    run = record_model(folder, run, pipeline.model_info)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    with folder.appender(PREDICTIONS) as log:  # appended and recorded line by line: resumable
        for done, item in enumerate(todo):
            show_progress(done, len(todo), item.key)
            try:
                answer = pipeline.ask(str(item.video), item.question, item.situation, sampling, num_frames=args.frames)
            except Loc3rError as exc:
                raise type(exc)(f"item {item.key!r} (dataset line {item.line}): {exc.problem}", exc.fix) from exc
            record = prediction_record(item, answer)
            write_record(log, record)
            records[item.key] = record
    show_progress(len(todo), len(todo), "")
    return run


def prediction_record(item: Item, answer: Any) -> dict[str, Any]:
    """One line of predictions.jsonl: the item's identity and what the model said."""
    pose = answer.pose
    record = {
        "key": item.key,
        "line": item.line,
        "video": item.video_field,
        "question": item.question,
        "situation": item.situation,
        "answer": answer.text,
        "pose": {"x": pose.x, "y": pose.y, "sigma": pose.sigma, "theta_rad": pose.theta_rad},
    }
    if item.meta is not None:
        record["meta"] = item.meta
    return record


def write_record(log: TextIO, record: dict[str, Any]) -> None:
    """Append one prediction and flush it: an interrupted run keeps every finished item."""
    log.write(finite_json(record, ensure_ascii=False) + "\n")
    log.flush()


def show_progress(done: int, total: int, key: str) -> None:
    """A one-line counter on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return
    end = "\n" if done == total else ""
    print(f"\r\033[K{PROG}: {done}/{total} items {key}", end=end, file=sys.stderr, flush=True)


# -- the output folder ----------------------------------------------------------------------


def open_run(folder: OwnedFolder, settings: dict[str, Any]) -> dict[str, Any]:
    """OUT/run.json: the settings the predictions were made with; resuming must match them."""
    out, path = folder.path, folder.path / RUN
    if path.exists():
        run = read_json(path)
        old = run.get("settings")
        if not isinstance(old, dict) or not isinstance(run.get("model", {}), dict):
            raise InputError(f"{path} is damaged", "delete it (the predictions stay) or pass another --out")
        for key, value in settings.items():
            if old.get(key) != value:
                raise InputError(
                    f"{out} holds predictions made with {key} = {old.get(key)!r}, not {value!r}",
                    "resume with the same settings, or pass another --out",
                )
        return run
    run = {"settings": settings}
    folder.write_text(RUN, finite_json(run, indent=2) + "\n")
    return run


def record_model(folder: OwnedFolder, run: dict[str, Any], model_info: Any) -> dict[str, Any]:
    """Store which model answered; refuse to mix predictions of two different checkpoints."""
    model = model_info.to_dict()
    old = run.get("model")
    if old and old.get("checksum") != model["checksum"]:
        raise InputError(
            f"{folder.path} holds predictions of model checksum {old.get('checksum')}, this one is {model['checksum']}",
            "pass another --out for a different checkpoint",
        )
    run = {**run, "model": model, "warning": model_info.warning}
    folder.write_text(RUN, finite_json(run, indent=2) + "\n")
    return run


def read_predictions(path: Path, items: Sequence[Item], partial: bool = False) -> dict[str, dict[str, Any]]:
    """Finished items by key (the file is as loc3r wrote it: ``open_owned_folder`` checked it
    against the digest recorded after its last whole line, and dropped any tail beyond).
    ``partial``: ``items`` are the first --limit ones; lines of later items are skipped."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):  # never left by loc3r: every recorded line is whole (loc3r.owned_folder)
        raise InputError(f"{path} ends in a partial line", "pass another --out to start afresh")
    by_key = {item.key: item for item in items}
    records: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        fix = "delete that line (its item will be rerun) or pass another --out"
        try:
            record = parse_json_line(line, where)
        except InputError as exc:
            raise InputError(exc.problem, fix) from None
        if not is_prediction(record):
            raise InputError(f"{where}: not a loc3r-eval prediction", fix)
        item = by_key.get(record["key"])
        if item is None and partial:  # an item beyond --limit: neither read nor scored
            continue
        if item is None or item.question != record["question"] or item.video_field != record["video"]:
            raise InputError(
                f"{where}: item {record['key']!r} is not in the dataset as it was (question or video changed?)",
                "pass another --out to start afresh",
            )
        records.setdefault(item.key, record)
    return records


PREDICTION_TEXT = ("key", "question", "video", "answer")
POSE_FIELDS = ("x", "y", "sigma", "theta_rad")


def is_prediction(record: Any) -> bool:
    """A line of predictions.jsonl as ``prediction_record`` writes it: texts, and a pose of
    finite numbers (null where the model gave a non-finite one)."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in PREDICTION_TEXT):
        return False
    pose = record.get("pose")
    return isinstance(pose, dict) and all(k in pose and (pose[k] is None or is_number(pose[k])) for k in POSE_FIELDS)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} not found", "check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"cannot read {path} ({exc})", "pass a JSON file written by loc3r-eval") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} is not a JSON object", "pass a JSON file written by loc3r-eval")
    return value


# -- scoring and reports --------------------------------------------------------------------


def score(items: Sequence[Item], records: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, int]]:
    """All metrics over ``items`` from their predictions; counts say how many items each used."""
    pred_xy, gt_xy, sigma, pred_theta, gt_theta = [], [], [], [], []
    em, em_r, choice, mra = [], [], [], []
    for item in items:
        record = records[item.key]
        pose = {k: math.nan if v is None else v for k, v in record["pose"].items()}  # null: a non-finite prediction
        text = record["answer"]
        if item.position is not None:
            pred_xy.append((pose["x"], pose["y"]))
            gt_xy.append(item.position)
            sigma.append(pose["sigma"])
        if item.orientation is not None:
            pred_theta.append(pose["theta_rad"])
            gt_theta.append(item.orientation)
        if item.kind == "open":
            em.append(metrics.exact_match(text, item.answer))
            em_r.append(metrics.refined_exact_match(text, item.answer))
        elif item.kind == "choice":
            choice.append(metrics.extract_choice(text, item.options) == item.answer)
        elif item.kind == "numeric":
            mra.append(metrics.mean_relative_accuracy(metrics.parse_number(text), item.answer))
    pos_err = metrics.position_errors(np.reshape(pred_xy, (-1, 2)), np.reshape(gt_xy, (-1, 2)))
    ang_err = metrics.angle_errors_deg(pred_theta, gt_theta)
    values = {
        **metrics.position_metrics(pos_err),
        **metrics.orientation_metrics(ang_err),
        "em": _mean(em),
        "em_r": _mean(em_r),
        "choice_acc": _mean(choice),
        "mra": _mean(mra),
        **metrics.uncertainty_metrics(sigma, pos_err),
    }
    counts = {"position": len(gt_xy), "orientation": len(gt_theta), "open": len(em), "choice": len(choice), "numeric": len(mra)}
    return values, counts


def _mean(values: list[float] | list[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def build_summary(data: Path, items: Sequence[Item], records: dict[str, dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    values, counts = score(items, records)
    return {
        "dataset": str(data),
        "items": len(items),
        "settings": run["settings"],
        "model": run.get("model"),
        "warning": run.get("warning"),
        "counts": counts,
        "metrics": values,
    }


def format_value(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if kind == "rate" else f"{value:.3f}"


def format_delta(a: float | None, b: float | None, kind: str) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{100 * (b - a):+.1f} pp" if kind == "rate" else f"{b - a:+.3f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a short markdown report with one table."""
    settings, model = summary["settings"], summary.get("model") or {}
    lines = [f"# {PROG}: {summary['dataset']}", ""]
    if summary.get("warning"):
        lines += [f"> **Warning:** {summary['warning']}", ""]
    frames = settings["frames"] or "model default"
    lines += [
        f"model `{settings['model']}` ({model.get('id', '?')}, checksum {str(model.get('checksum', '?'))[:12]}), "
        f"backend {settings['backend']}, frames {frames}, max new tokens {settings['max_new_tokens']}; "
        f"{summary['items']} items",
        "",
        "| metric | value | items |",
        "|---|---:|---:|",
    ]
    for key, label, kind, count_key in METRIC_ROWS:
        count = summary["counts"].get(count_key, 0)
        if count:
            lines.append(f"| {label} | {format_value(summary['metrics'].get(key), kind)} | {count} |")
    if summary.get("calibration"):
        lines += calibration_markdown(summary["calibration"])
    return "\n".join(lines) + "\n"


def calibration_markdown(report: dict[str, Any]) -> list[str]:
    """The calibration's ECE table (both methods, in-sample and 5-fold held-out) and a hint
    when the other method is clearly better calibrated on held-out items."""
    lines = ["", f"## Calibration: {report['method']} on {report['items']} items", "", f"{report['note']}.", "",
             "| P(error <= r) | hit rate | ECE logistic (held-out) | ECE isotonic (held-out) |", "|---|---:|---:|---:|"]
    hints = []
    other = "isotonic" if report["method"] == "logistic" else "logistic"
    for key, entry in report["radii"].items():
        ece = entry["ece"]
        cells = [f"{ece[m]['in_sample']:.3f} ({ece[m]['held_out']:.3f})" for m in ("logistic", "isotonic")]
        lines.append(f"| {key.replace('within_', 'r = ')} | {100 * entry['hit_rate']:.1f}% | {cells[0]} | {cells[1]} |")
        if ece[other]["held_out"] < 0.8 * ece[report["method"]]["held_out"]:
            hints.append(key)
    lines += ["", f"Written to `{report['file']}`; reliability diagram `{report['reliability_png']}`."]
    if hints:
        lines.append(f"The other method has a clearly lower held-out ECE at {', '.join(hints)}: try --calibrate-method {other}.")
    return lines


def read_summary(path: str) -> dict[str, Any]:
    summary = read_json(Path(path))
    metrics = summary.get("metrics")
    if not isinstance(metrics, dict):
        raise InputError(f"{path} is not a loc3r-eval summary (no 'metrics')", "pass OUT/summary.json files")
    for key, _, _, _ in METRIC_ROWS:
        if metrics.get(key) is not None and not is_number(metrics[key]):
            raise InputError(f"{path}: metric {key!r} is {metrics[key]!r}, not a number", "pass OUT/summary.json files written by loc3r-eval")
    return summary


def compare_markdown(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Metric deltas B - A as a markdown table (rates in percentage points)."""
    lines = []
    if a.get("dataset") != b.get("dataset") or a.get("items") != b.get("items"):
        lines += [f"> Note: A ran on {a.get('dataset')} ({a.get('items')} items), B on {b.get('dataset')} ({b.get('items')} items).", ""]
    lines += ["| metric | A | B | B - A |", "|---|---:|---:|---:|"]
    for key, label, kind, _ in METRIC_ROWS:
        va, vb = a["metrics"].get(key), b["metrics"].get(key)
        if va is None and vb is None:
            continue
        lines.append(f"| {label} | {format_value(va, kind)} | {format_value(vb, kind)} | {format_delta(va, vb, kind)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
