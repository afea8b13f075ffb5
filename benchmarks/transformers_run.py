"""The baseline as a user would run it, as one fresh process: transformers' llava-onevision
+ CUT3R over a bundle, one video, one question, the first token printed.

``python -m loc3r.bench.transformers_run VIDEO QUESTION [--model M] [--frames N]`` does
what ``loc3r-run VIDEO QUESTION --max-new-tokens 1`` does, with the baseline's pieces
(``loc3r.bench.baseline``: transformers' ``load_video``, CUT3R frame by frame, transformers'
video features, ``generate``; fp32, SDPA) and prints what loc3r-run prints before and at
the first token (``A: `` then the token), then the same ``first token after`` line, the
cold time to first token counted from the moment the model is loaded and the video given.
``loc3r-bench --fresh-process`` runs both and times them from outside.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loc3r.bench.transformers_run", description=__doc__.splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("question")
    parser.add_argument("--model", default="tiny", help="'tiny', 'small' or a bundle folder")
    parser.add_argument("--frames", type=int, default=32)
    args = parser.parse_args(argv)

    import torch

    from loc3r.bench.baseline import Baseline
    from loc3r.bench.presets import resolve_bench_model
    from loc3r.models.bundle import load_bundle
    from loc3r.models.layout import video_end_tokens, vision_tokens_per_frame
    from loc3r.models.prompt import build_question_suffix, build_video_prefix

    baseline = Baseline(load_bundle(resolve_bench_model(args.model)))
    tokenizer, config = baseline.bundle.tokenizer, baseline.config
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    given_at = time.perf_counter()
    with torch.inference_mode():
        rgbs, metadata = baseline.decode(args.video, args.frames)
        images, pixels = baseline.preprocess(rgbs)
        cameras = baseline.encode_3d(images)
        vision = baseline.encode_vision(pixels)
        times = [int(i) / metadata.fps for i in metadata.frames_indices]
        prefix = build_video_prefix(tokenizer, len(rgbs), vision_tokens_per_frame(config), metadata.duration, times, video_end_tokens(config))
        suffix = build_question_suffix(tokenizer, args.question)
        table = baseline.model.get_input_embeddings()
        ids = lambda values: table(torch.tensor(values))  # noqa: E731
        prompt = torch.cat([ids(prefix.head_ids), baseline.video_embeds(cameras, vision), ids(prefix.tail_ids), ids(suffix.ids)])
        out = baseline.model.generate(inputs_embeds=prompt[None], max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    print(tokenizer.decode(out[0, -1:].tolist()), flush=True)
    print(f"first token after {time.perf_counter() - given_at:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
