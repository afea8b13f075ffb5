"""``loc3r-convert``: a published LLaVA-Video checkpoint + a 3D encoder (CUT3R ``.pth`` or
VGGT) (+ Loc3R heads) into a loc3r bundle, streamed tensor by tensor."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from loc3r.cli_support import ArgumentParser, run_cli
from loc3r.models.config import VIDEO_LAYOUTS, Loc3rConfig

PROG = "loc3r-convert"
DTYPES = ("bfloat16", "float16", "float32")  # torch's names: torch loads only once a conversion starts


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--llava", type=Path, required=True,
                        help="LLaVA-Video folder: LLaVA-NeXT layout or transformers' llava-onevision (-hf)")
    encoder = parser.add_mutually_exclusive_group(required=True)
    encoder.add_argument("--cut3r", type=Path, help="the 3D encoder: an official CUT3R checkpoint (.pth)")
    encoder.add_argument("--vggt", type=Path,
                         help="the 3D encoder: VGGT's model.pt or model.safetensors (facebook/VGGT-1B), or its folder")
    parser.add_argument("--loc3r-heads", type=Path,
                        help="Loc3R heads (f_cam, f_pos, f_ori, f_bev; safetensors or .pth); "
                             "without it the heads are random and the bundle is marked untrained")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced if it exists)")
    parser.add_argument("--model-id", help="name recorded in config.json (default: the LLaVA folder's name)")
    parser.add_argument("--dtype", choices=DTYPES, help="cast floating tensors (default: keep each tensor's dtype)")
    parser.add_argument("--video-layout", choices=VIDEO_LAYOUTS,
                        help="video token layout: llava-video (LLaVA-NeXT's code: the checkpoint's mm_* pooling and "
                             "newlines, 210 tokens per frame for LLaVA-Video-7B) or onevision (transformers' "
                             "LlavaOnevision: 196 per frame + one newline per video); default: the layout of the code "
                             "the checkpoint is published for (llava-video for LLaVA-NeXT folders, onevision for -hf)")
    parser.add_argument("--pool-mode", choices=("bilinear", "average", "max"),
                        help="spatial pooling under --video-layout llava-video (default: the checkpoint's; "
                             "LLaVA-Video's bilinear for -hf folders)")
    parser.add_argument("--vision-heads", type=int,
                        help="SigLIP attention heads, for a LLaVA-NeXT tower not in the built-in table")
    parser.add_argument("--vision-image-size", type=int,
                        help="side in pixels frames are resized to, for a checkpoint that does not state it "
                             "(no processor config, no 'patchP-SIZE' tower name)")
    parser.add_argument("--max-shard-mb", type=float, default=2000.0, help="largest output shard in MB (default 2000)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_shard_mb <= 0:
        parser.error("--max-shard-mb must be positive")
    for flag, value in (("--vision-heads", args.vision_heads), ("--vision-image-size", args.vision_image_size)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be positive")

    def body() -> int:
        import torch

        from loc3r.models.convert_bundle import ConvertOptions, convert
        from loc3r.models.layout import layout_summary

        out = convert(ConvertOptions(
            llava=args.llava,
            cut3r=args.cut3r,
            vggt=args.vggt,
            out=args.out,
            heads=args.loc3r_heads,
            model_id=args.model_id,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            pool_mode=args.pool_mode,
            vision_heads=args.vision_heads,
            vision_image_size=args.vision_image_size,
            video_layout=args.video_layout,
            max_shard_bytes=int(args.max_shard_mb * 1_000_000),
        ))
        config = Loc3rConfig.load(out)
        chosen = "chosen with --video-layout" if args.video_layout else "the checkpoint's default"
        print(f"{PROG}: {layout_summary(config)} ({chosen})", file=sys.stderr)
        print(out)
        return 0

    return run_cli(PROG, body, args.debug)
