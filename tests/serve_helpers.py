"""Helpers of the server tests: one tiny pipeline per test process, request bodies, a
static file server on 127.0.0.1, Prometheus figures."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loc3r.runtime.pipeline import Pipeline


@functools.cache
def tiny_pipeline() -> Pipeline:
    """Loaded once per process; each server's worker owns it while that server runs."""
    return Pipeline.from_pretrained("tiny")


def video_message(url: str, question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]}]


def chat_body(url: str, question: str, **fields: Any) -> dict[str, Any]:
    return {"model": "loc3r", "messages": video_message(url, question), **fields}


def metric(text: str, name: str) -> float:
    """The value of sample ``name`` (no labels) in Prometheus text; 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return 0.0


@contextmanager
def static_http(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port); yield the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
