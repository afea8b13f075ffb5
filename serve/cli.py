"""``loc3r-serve``: the OpenAI-compatible server and its web page."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from loc3r.cli_support import ArgumentParser, run_cli
from loc3r.errors import InputError
from loc3r.progress import announce_loading
from loc3r.runtime.cli import add_dtype_argument, positive_int
from loc3r.serve.settings import MIB, ServeSettings

PROG = "loc3r-serve"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Serve Loc3R-VLM over HTTP: OpenAI-style chat completions with a video part, every "
        "answer with the camera pose; a web page with a live map at /. Binds 127.0.0.1 unless told otherwise.",
    )
    parser.add_argument("--model", default="tiny", help="bundle folder, or 'tiny' (built-in, random weights)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"])
    add_dtype_argument(parser, "/health reports what ran and why")
    parser.add_argument("--engines", help="folder written by loc3r-export (for onnxruntime / tensorrt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --api-key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LOC3R_API_KEY"), help="require 'Authorization: Bearer KEY' (default: $LOC3R_API_KEY)")
    parser.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="a name clients reach the server by, besides its address and localhost (e.g. a LAN name; '.example.org' "
        "takes its subdomains); other Host headers are refused (DNS rebinding)",
    )
    parser.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN",
        help="a web page of another origin allowed to use the API (scheme://host[:port]; '*': any, unsafe without --api-key)",
    )
    parser.add_argument("--media-dir", type=Path, help="folder of videos clients may name by relative path")
    parser.add_argument("--upload-dir", type=Path, help="where uploads are kept (default: $LOC3R_HOME/serve/uploads)")
    parser.add_argument("--allow-remote-urls", action="store_true", help="let clients name http(s) video URLs for the server to download")
    parser.add_argument(
        "--allow-private-urls", nargs="*", metavar="NETWORK",
        help="let downloads reach loopback, private and link-local addresses: those NETWORKs (CIDR), or all when none given",
    )
    parser.add_argument("--max-upload-mb", type=positive_int, default=512, help="largest video accepted (upload or download)")
    parser.add_argument("--max-frames", type=positive_int, default=None, help="most frames a question may ask for (default: the model's)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, help="most answer tokens a question may ask for")
    parser.add_argument("--queue", type=positive_int, default=16, help="questions that may wait for the model before 429s")
    parser.add_argument("--session-memory-mb", type=positive_int, default=2048, help="memory for videos kept encoded for follow-ups")
    parser.add_argument("--scene-memory-mb", type=int, default=1024,
                        help="memory for scenes' KV kept resident (LRU; others reload from the scene store or are prefilled); 0: none")
    parser.add_argument(
        "--live", action="append", default=[], metavar="NAME=SOURCE", help="a live source clients may ask about as live:NAME (camera:N, rtsp://...)"
    )
    parser.add_argument("--stride", type=positive_int, default=15, help="live sources: keep every N-th frame (default 15)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk encoding cache")
    parser.add_argument("--calibration", metavar="FILE", help="sigma -> confidence calibration (default: BUNDLE/calibration.json if present)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def live_sources(specs: Sequence[str]) -> dict[str, str]:
    sources = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise InputError(f"--live {spec!r} is not NAME=SOURCE", "e.g. --live front=camera:0 or --live door=rtsp://host/stream")
        sources[name] = source
    return sources


def private_networks(given: list[str] | None) -> tuple[str, ...]:
    """``--allow-private-urls`` as settings: absent -> none, bare -> all ("*"), else the networks."""
    if given is None:
        return ()
    return tuple(given) or ("*",)


SERVE_MODULES = ("fastapi", "uvicorn", "sse_starlette", "python_multipart", "prometheus_client", "httpcore")


def require_serve_extra() -> None:
    """Refuse, with the install line, when the ``serve`` extra is missing."""
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"loc3r-serve needs {', '.join(missing)}, which is not installed", "pip install 'loc3r[serve]'")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        require_serve_extra()
        settings = ServeSettings(
            host=args.host, port=args.port, api_key=args.api_key, media_dir=args.media_dir,
            upload_dir=args.upload_dir, allow_remote_urls=args.allow_remote_urls,
            allow_private_urls=private_networks(args.allow_private_urls),
            allowed_hosts=tuple(args.allowed_host), cors_origins=tuple(args.cors_origin),
            max_upload_bytes=args.max_upload_mb * MIB, max_new_tokens=args.max_new_tokens, queue_size=args.queue,
            session_memory_bytes=args.session_memory_mb * MIB, scene_memory_bytes=max(0, args.scene_memory_mb) * MIB, live_sources=live_sources(args.live), live_stride=args.stride,
            max_frames=args.max_frames,
        )
        settings.check()  # before the model loads: a refused address answers at once
        loaded = announce_loading(PROG, f"model {args.model} ({args.backend} backend)")
        from loc3r.runtime.pipeline import Pipeline, default_cache_dir
        from loc3r.serve.server import build_server, serve_forever

        pipeline = Pipeline.from_pretrained(
            args.model, backend=args.backend, engines=args.engines, cache_dir=None if args.no_cache else default_cache_dir(),
            dtype=args.dtype, calibration=args.calibration,
        )
        loaded()
        serve_forever(build_server(pipeline, settings), args.log_level)
        return 0

    return run_cli(PROG, body, args.debug)


def console_main() -> NoReturn:
    """The ``loc3r-serve`` command: ``main``, then an exit without the interpreter's teardown.

    Once the server has stopped and its own cleanup ran (every ``finally``), tearing down
    torch and the model's objects took 8-9 s on the loaded 2-core machine: Ctrl-C must stop
    the server at once, so the process ends right after flushing its output and logs."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
