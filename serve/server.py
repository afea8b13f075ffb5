"""Build the server from settings, and run it: in the foreground (``loc3r-serve``) or in a
background thread on a free loopback port (tests, the load benchmark)."""

from __future__ import annotations

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
from loc3r.serve.metrics import ServeMetrics
from loc3r.serve.settings import ServeSettings, is_loopback
from loc3r.serve.uploads import UploadStore
from loc3r.serve.worker import ModelWorker


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
    """Run until interrupted (``loc3r-serve``)."""
    server.worker.start()
    try:
        uvicorn.run(server.app, host=server.settings.host, port=server.settings.port, log_level=log_level)
    finally:
        server.worker.stop()


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
