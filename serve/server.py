"""Build the server from settings, and run it: in the foreground (``loc3r-serve``) or in a
background thread on a free loopback port (tests, the load benchmark)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import uvicorn
from fastapi import FastAPI

from loc3r.models.tiny import loc3r_home
from loc3r.runtime.pipeline import Pipeline
from loc3r.serve.app import create_app
from loc3r.serve.banner import banner
from loc3r.serve.media import MediaResolver
from loc3r.serve.metrics import ServeMetrics
from loc3r.serve.settings import ServeSettings, is_loopback
from loc3r.serve.uploads import UploadStore
from loc3r.serve.worker import ModelWorker


SHUTDOWN_GRACE_S = 0.5  # open connections (a streamed answer) get this long after Ctrl-C
STOP_WAIT_S = 0.5  # then the model thread gets this long to leave its question


@dataclass
class Server:
    app: FastAPI
    worker: ModelWorker
    settings: ServeSettings


def build_server(pipeline: Pipeline, settings: ServeSettings) -> Server:
    """Check the settings, then wire the worker, the upload store and the app."""
    settings.check()
    settings = replace(
        settings,
        max_frames=settings.max_frames or pipeline.config.num_frames,
        upload_dir=settings.upload_dir or loc3r_home() / "serve" / "uploads",
    )
    pipeline.check_frames_fit(settings.max_frames)
    worker = ModelWorker(pipeline, settings, ServeMetrics())
    uploads = UploadStore(settings.upload_dir, settings.max_upload_bytes, settings.upload_store_bytes)
    return Server(create_app(worker, settings, uploads), worker, settings)


def serve_forever(server: Server, log_level: str = "info") -> None:
    """Say what is served (the banner, on stderr), then run until interrupted (``loc3r-serve``).

    Ctrl-C stops within about two seconds even with a question running: open streams get
    ``SHUTDOWN_GRACE_S`` to finish, the question being answered is cancelled, and the model
    thread (a daemon) is not waited for beyond ``STOP_WAIT_S`` (a frame encoding has no
    cancellation point)."""
    settings = server.settings
    media = MediaResolver(settings, None).media_files() if settings.media_dir else None  # type: ignore[arg-type] - listing needs no uploads
    for line in banner(server.worker.pipeline.model_info, settings, media):
        print(f"loc3r-serve: {line}", file=sys.stderr, flush=True)
    server.worker.start()
    try:
        uvicorn.run(server.app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    finally:
        server.worker.stop(wait_s=STOP_WAIT_S)


@contextmanager
def running(server: Server, port: int = 0, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve on ``127.0.0.1`` (a free port by default) in a background thread; yield the base URL."""
    if not is_loopback(server.settings.host):
        raise ValueError("background servers bind to loopback only")
    config = uvicorn.Config(server.app, host=server.settings.host, port=port, log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="loc3r-http", daemon=True)
    server.worker.start()
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)
    bound = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{server.settings.host}:{bound}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        server.worker.stop()
