"""``loc3r-run VIDEO QUESTION... [options]``: answer questions about a video, with the pose."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loc3r.cli_support import ArgumentParser, positive_int, run_cli
from loc3r.errors import InputError, QuestionFailed, one_question
from loc3r.fileio import check_output_file, finite_json
from loc3r.models.config import DTYPE_CHOICES
from loc3r.models.prompt import build_question_suffix, check_text_fits, check_user_text
from loc3r.progress import announce_loading, step_lines, terminal_output
from loc3r.runtime.confidence import check_min_confidence
from loc3r.runtime.generate import SamplingConfig, TextStream

if TYPE_CHECKING:  # torch and transformers load only once a run starts, not for --help or a usage error
    from loc3r.runtime.result import Answer, ModelInfo, Pose

PROG = "loc3r-run"
EXIT_NOT_LOCALIZED = 3  # every question answered, but a pose was below --min-confidence


def add_dtype_argument(parser: argparse.ArgumentParser, reported: str) -> None:
    """``--dtype``: the PyTorch model's dtype (torch backend), ``auto`` by default."""
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="dtype of the PyTorch model (torch backend): auto = the checkpoint's on a GPU; on a CPU "
                             f"float32 when it fits in memory, else the checkpoint's 16-bit dtype ({reported})")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Answer questions about a video with Loc3R-VLM; every answer carries "
        "the camera position (x, y, sigma in metres) and orientation read from <Pos>/<Ori>.",
    )
    parser.add_argument("video", nargs="?", help="video file (any container/codec FFmpeg reads); omit with --source")
    parser.add_argument("questions", nargs="*", metavar="QUESTION", help="questions; later ones reuse the video's KV cache")
    parser.add_argument("-i", "--interactive", action="store_true", help="read questions from stdin, one per line")
    parser.add_argument("--source", help="live source instead of a file: camera:N, rtsp://..., or - (raw RGB24 frames on stdin)")
    parser.add_argument("--stride", type=positive_int, default=15, help="live sources: keep every N-th frame (default 15)")
    parser.add_argument("--frame-size", type=frame_size, metavar="WxH", help="size of raw frames on stdin (--source -)")
    parser.add_argument("--situation", default="", help="situation text placed before <Pos><Ori>")
    parser.add_argument("--scene", help="a scene named with loc3r-scene add: its video and frames (every positional is then a question)")
    parser.add_argument("--pose-only", action="store_true",
                        help="no answer: each positional is a situation; print its pose (situations batched over the video's KV)")
    parser.add_argument("--model", default="tiny", help="bundle folder, or 'tiny' / 'tiny-vggt' (built-in, random weights; CUT3R / VGGT as the 3D encoder)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"], help="inference backend")
    add_dtype_argument(parser, "--json reports what ran and why")
    parser.add_argument("--engines", help="folder written by loc3r-export (for onnxruntime / tensorrt)")
    parser.add_argument("--frames", type=positive_int, default=None, help="frames to sample (default: the model's, 32); live: the maximum")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk encoding cache")
    parser.add_argument("--plot", metavar="PNG", help="write a top-down map (layout, position, sigma, heading); several questions get _2, _3... suffixes")
    parser.add_argument("--calibration", metavar="FILE", help="sigma -> confidence calibration (default: BUNDLE/calibration.json if present)")
    parser.add_argument("--min-confidence", type=probability, metavar="P",
                        help="a pose whose P(error <= --confidence-radius) is below P is 'not localized' (JSON localized: false; exit 3)")
    parser.add_argument("--confidence-radius", type=float, default=1.0, choices=[0.5, 1.0], help="metres, for --min-confidence (default 1.0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per question, nothing else")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def probability(text: str) -> float:
    """A number from 0 to 1 (``--min-confidence``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability from 0 to 1")
    return value


def frame_size(text: str) -> tuple[int, int]:
    from loc3r.runtime.video import MAX_DECODE_PIXELS

    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    if width * height > MAX_DECODE_PIXELS:
        raise argparse.ArgumentTypeError(f"{text} is larger than loc3r reads (at most 8192x8192 pixels); scale the frames down")
    return width, height


def numbered_path(path: Path, number: int) -> Path:
    """``bev.png`` for the first question, ``bev_2.png`` for the second, ..."""
    return path if number == 1 else path.with_name(f"{path.stem}_{number}{path.suffix}")


class TokenPrinter(TextStream):
    """Prints generated text as it arrives, holding back incomplete UTF-8 sequences."""

    def __call__(self, token: int) -> None:
        delta = self.push(token)
        if delta:
            sys.stdout.write(delta)
            sys.stdout.flush()


def print_human(answer: Answer, streamed_chars: int) -> None:
    """The rest of the answer (if not streamed) and the pose, for a person."""
    print(answer.text[streamed_chars:])
    pose = answer.pose
    print(f"position: x = {pose.x:+.3f} m, y = {pose.y:+.3f} m, sigma = {pose.sigma:.3f} m")
    print(f"orientation: {pose.theta_deg:+.1f} deg ({pose.theta_rad:+.4f} rad)")
    print(confidence_line(answer.pose, answer.model))
    if answer.localized is False:
        print(f"NOT LOCALIZED: {answer.not_localized}")
    print(first_token_line(answer.timings))
    if answer.model.warning:
        print(f"NOTE: {answer.model.warning}")


def confidence_line(pose: Pose, model: ModelInfo) -> str:
    """``confidence: P(error <= 0.5 m) = .., P(error <= 1.0 m) = ..`` and what it means, or why there is none."""
    if pose.confidence is None:
        return f"confidence: none ({model.confidence_note})"
    values = ", ".join(f"P(error <= {key[7:-1]} m) = {p:.3f}" for key, p in pose.confidence.items())
    return f"confidence: {values} ({model.confidence_note})"


def first_token_line(timings: dict[str, float]) -> str:
    """When the first token came, split into the video part and the question's own part."""
    ttft, video, question = timings["ttft_s"], timings["video_s"], timings["question_to_first_token_s"]
    return f"first token after {ttft:.3f} s: video {video:.3f} s, question {question:.3f} s"


def stdin_questions() -> Iterator[str]:
    """Non-empty lines of stdin, with a prompt when it is a terminal."""
    while True:
        if sys.stdin.isatty():
            print("question> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def check_arguments(args: argparse.Namespace) -> None:
    if args.scene:
        if args.source:
            raise InputError("--scene and --source both name the video", "pass one of them")
        from loc3r.runtime.scenes import find_scene

        named = find_scene(args.scene)
        if args.video:
            args.questions.insert(0, args.video)  # with --scene, every positional is a question
        args.video, args.frames = named.video, args.frames or named.frames
    if args.pose_only:
        if args.source or args.interactive or args.plot:
            raise InputError("--pose-only takes a video file or --scene, situations as arguments, no -i or --plot",
                             "drop --source, -i and --plot")
        args.questions = args.questions or [args.situation]
        for situation in args.questions:
            check_user_text(situation, "situation")
        return
    if args.source and args.video:
        args.questions.insert(0, args.video)  # with --source, every positional is a question
        args.video = None
    if not args.source and not args.video:
        raise InputError("no video given", "pass a video file, or --source for a live source")
    if not args.questions and not args.interactive:
        raise InputError("no question given", "pass a question after the video, or -i to type them")
    if args.interactive and args.source == "-":
        raise InputError("stdin cannot carry both frames and questions", "pass questions as arguments with --source -")
    for question in args.questions:  # before any model is loaded or frame decoded
        check_user_text(question, "question", allow_empty=False)
    check_user_text(args.situation, "situation")
    if args.plot:
        for number in range(1, max(len(args.questions), 1) + 1):
            check_plot_path(numbered_path(Path(args.plot), number), args)
        check_writable_folder(Path(args.plot).parent)


def check_plot_path(path: Path, args: argparse.Namespace) -> None:
    """A ``.png`` that is not the input video (checked for every numbered plot too)."""
    check_output_file(path, "--plot", (".png",), inputs=[Path(args.video)] if args.video else [])


def check_writable_folder(folder: Path) -> None:
    """Refuse an output folder that cannot be written, before any work is done."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    if not existing.is_dir():
        raise InputError(f"cannot write the --plot file: {existing} is not a folder", "choose another --plot path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {existing} (permission denied)", "choose a folder you can write to for --plot")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        check_arguments(args)  # before the heavy imports: a usage error answers at once
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        from loc3r.runtime.preflight import preflight

        checked = preflight(args.model, args.backend, args.engines, args.video)  # before torch or any weight loads
        fresh = "torch" not in sys.modules  # a person's own run: the waits are said (in-process callers hold torch)
        loaded = announce_loading(PROG, f"model {args.model} ({args.backend} backend)")
        args.frame_lines = step_lines(PROG, "encoding frames") if fresh and not terminal_output(args.json) else None
        from loc3r.runtime.pipeline import Pipeline, default_cache_dir

        pipeline = Pipeline.from_pretrained(
            args.model, backend=args.backend, engines=args.engines, cache_dir=None if args.no_cache else default_cache_dir(),
            dtype=args.dtype, calibration=args.calibration,
        )
        loaded()
        check_min_confidence(args.min_confidence, args.confidence_radius, pipeline.model_info.calibration, "--min-confidence")
        if args.pose_only:
            return print_poses(pipeline, args)
        not_localized = 0
        live_errors = BackgroundErrors()
        given_at = None  # the first question given with a video file waits for the video: TTFT counts from here
        if args.source:
            session = open_live(pipeline, args, live_errors)
        else:
            given_at = time.perf_counter() if args.questions else None
            check_fit(pipeline, args, args.frames or pipeline.config.num_frames, checked.video.duration_s)
            session = pipeline.open(
                args.video, args.frames, with_bev=bool(args.plot), show_progress=terminal_output(args.json), on_frame=args.frame_lines
            )
        for number, question in enumerate(iter_questions(args), start=1):
            live_errors.raise_first()
            printer = None if args.json else TokenPrinter(pipeline.bundle.tokenizer)
            if printer:
                print(f"Q: {question}\nA: ", end="", flush=True)
            try:
                answer = session.ask(question, args.situation, sampling, on_token=printer, given_at=given_at)
            except (InputError, QuestionFailed) as exc:  # this question's fault: the model and the video stay usable
                if not args.interactive:
                    raise
                print(f"\n{PROG}: error: {exc}", file=sys.stderr)  # ask again
                continue
            finally:
                given_at = None  # later questions count from their own turn
            answer = answer.require_confidence(args.min_confidence, args.confidence_radius)
            not_localized += answer.localized is False
            plotted = None
            if args.plot:
                check_plot_path(numbered_path(Path(args.plot), number), args)
                plotted = answer.plot(numbered_path(Path(args.plot), number))
            if args.json:
                print(finite_json({**answer.to_dict(), **({"plot": str(plotted)} if plotted else {})}), flush=True)
            else:
                print_human(answer, printer.shown if printer else 0)
                if plotted:
                    print(f"map: {plotted}")
        live_errors.raise_first()  # a live source that failed after the last question
        if not_localized:
            print(f"{PROG}: {not_localized} pose(s) below --min-confidence {args.min_confidence:g}: not localized", file=sys.stderr)
            return EXIT_NOT_LOCALIZED
        return 0

    return run_cli(PROG, body, args.debug)


def print_poses(pipeline, args: argparse.Namespace) -> int:  # noqa: ANN001 - Pipeline
    """``--pose-only``: every situation's pose from one pass over the video's KV."""
    from loc3r.runtime.confidence import not_localized_reason
    from loc3r.runtime.result import pose_record

    session = pipeline.open(args.video, args.frames, show_progress=terminal_output(args.json), on_frame=args.frame_lines)
    start = time.perf_counter()
    poses = session.locate(args.questions)
    seconds = time.perf_counter() - start
    missed = 0
    for situation, pose in zip(args.questions, poses, strict=True):
        reason = None if args.min_confidence is None else not_localized_reason(pose.confidence, args.min_confidence, args.confidence_radius)
        missed += reason is not None
        if args.json:
            out = {"situation": situation, **pose_record(pose, pipeline.model_info, reason, args.min_confidence is not None),
                   "timings": {"locate_s": round(seconds, 6), "situations": len(poses)},
                   "video": session.describe(), "model": pipeline.model_info.to_dict()}
            if pipeline.model_info.warning:
                out["warning"] = pipeline.model_info.warning
            print(finite_json(out), flush=True)
            continue
        print(f"situation: {situation}")
        if reason:
            print(f"NOT LOCALIZED: {reason}")
        print(f"position: x = {pose.x:+.3f} m, y = {pose.y:+.3f} m, sigma = {pose.sigma:.3f} m")
        print(f"orientation: {pose.theta_deg:+.1f} deg ({pose.theta_rad:+.4f} rad)")
        print(confidence_line(pose, pipeline.model_info))
    if not args.json:
        print(f"{len(poses)} pose(s) in {seconds:.3f} s (no answer decoded)")
        if pipeline.model_info.warning:
            print(f"NOTE: {pipeline.model_info.warning}")
    if missed:
        print(f"{PROG}: {missed} pose(s) below --min-confidence {args.min_confidence:g}: not localized", file=sys.stderr)
        return EXIT_NOT_LOCALIZED
    return 0


def iter_questions(args: argparse.Namespace) -> Iterator[str]:
    yield from args.questions
    if args.interactive:
        yield from stdin_questions()


def check_fit(pipeline, args: argparse.Namespace, frames: int, duration_s: float | None = None) -> None:  # noqa: ANN001 - Pipeline
    """Refuse, before any frame is decoded, frames + questions + --max-new-tokens beyond the context."""
    tokenizer = pipeline.bundle.tokenizer
    for text, what in [*((q, "question") for q in args.questions), (args.situation or "", "situation")]:
        check_text_fits(tokenizer, text, pipeline.stages.llm.context_limit, what)
    with one_question():  # the questions are tokenized here first: a panic on one is that question's error
        question = max((len(build_question_suffix(tokenizer, q, args.situation).ids) for q in args.questions or ["?"]))
    extra = {} if duration_s is None else {"duration_s": duration_s}
    pipeline.check_frames_fit(frames, args.max_new_tokens, question, **extra)


class BackgroundErrors:
    """Errors of the background frame feeder, re-raised in the main thread at the next question
    (or at the end): any exception, so that none is lost as a thread traceback."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def run(self, feed: Callable[[], None]) -> None:
        try:
            feed()
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which reports it
            self.errors.append(exc)

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


def open_live(pipeline, args: argparse.Namespace, errors: BackgroundErrors):  # noqa: ANN001, ANN201 - Pipeline, VideoSession
    """Feed a live source into a session: in the background with -i, else up to --frames first."""
    from loc3r.runtime.sources import live_frames

    max_frames = args.frames or pipeline.config.num_frames
    check_fit(pipeline, args, max_frames)
    frames = live_frames(args.source, args.stride, max_frames, args.frame_size)
    # without -i every frame arrives before the first question: a bounded clip, not a live one
    session = pipeline.new_session(args.source, with_bev=bool(args.plot), live=args.interactive)
    if not args.interactive:
        for frame in frames:
            session.add_frame(frame)
        session.finish()
        return session
    feed = lambda: [session.add_frame(f) for f in frames]  # noqa: E731
    threading.Thread(target=errors.run, args=(feed,), name="loc3r-live", daemon=True).start()
    return session


if __name__ == "__main__":
    sys.exit(main())
