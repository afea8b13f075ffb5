"""``loc3r-run VIDEO QUESTION... [options]``: answer questions about a video, with the pose."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from loc3r.cli_support import run_cli
from loc3r.models.tokenizer import TextTokenizer
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.result import Answer

PROG = "loc3r-run"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Answer questions about a video with Loc3R-VLM; every answer carries "
        "the camera position (x, y, sigma in metres) and orientation read from <Pos>/<Ori>.",
    )
    parser.add_argument("video", help="video file (any container/codec FFmpeg reads)")
    parser.add_argument("questions", nargs="+", metavar="QUESTION", help="one or more questions; later ones reuse the video's cache")
    parser.add_argument("--situation", default="", help="situation text placed before <Pos><Ori>")
    parser.add_argument("--model", default="tiny", help="bundle folder, or 'tiny' (built-in, random weights)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"], help="inference backend")
    parser.add_argument("--engines", help="folder written by loc3r-export (for onnxruntime / tensorrt)")
    parser.add_argument("--frames", type=positive_int, default=None, help="frames to sample (default: the model's, 32)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", help="write a top-down map (layout, position, sigma, heading); several questions get _2, _3... suffixes")
    parser.add_argument("--json", action="store_true", help="print one JSON object per question, nothing else")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def numbered_path(path: Path, number: int) -> Path:
    """``bev.png`` for the first question, ``bev_2.png`` for the second, ..."""
    return path if number == 1 else path.with_name(f"{path.stem}_{number}{path.suffix}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class TokenPrinter:
    """Prints generated text as it arrives, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.shown :])
            sys.stdout.flush()
            self.shown = len(text)


def print_human(answer: Answer, streamed_chars: int) -> None:
    """The rest of the answer (if not streamed) and the pose, for a person."""
    print(answer.text[streamed_chars:])
    pose = answer.pose
    print(f"position: x = {pose.x:+.3f} m, y = {pose.y:+.3f} m, sigma = {pose.sigma:.3f} m")
    print(f"orientation: {pose.theta_deg:+.1f} deg ({pose.theta_rad:+.4f} rad)")
    if "ttft_s" in answer.timings:
        print(f"time to first token: {answer.timings['ttft_s']:.3f} s")
    if answer.model.warning:
        print(f"NOTE: {answer.model.warning}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from loc3r.runtime.pipeline import Pipeline

        pipeline = Pipeline.from_pretrained(args.model, backend=args.backend, engines=args.engines)
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        encoding = pipeline.encode_video(args.video, args.frames)
        for number, question in enumerate(args.questions, start=1):
            printer = None if args.json else TokenPrinter(pipeline.bundle.tokenizer)
            if printer:
                print(f"Q: {question}\nA: ", end="", flush=True)
            answer = pipeline.ask(
                encoding, question, args.situation, sampling, on_token=printer, with_bev=bool(args.plot)
            )
            if args.plot:
                answer.plot(numbered_path(Path(args.plot), number))
            if args.json:
                print(json.dumps(answer.to_dict()), flush=True)
            else:
                print_human(answer, printer.shown if printer else 0)
        return 0

    return run_cli(PROG, body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
