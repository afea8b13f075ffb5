"""loc3r-serve as a person starts it: the banner says what is served and to whom, and Ctrl-C
stops it within 2 s even while a question is being answered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx

from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.result import ModelInfo
from loc3r.serve.banner import banner
from loc3r.serve.media import MediaListing
from loc3r.serve.settings import ServeSettings

# loc3r-serve whose questions block for a minute in a step with no cancellation point (a long
# frame encoding), after streaming one token: Ctrl-C must not wait for it
BLOCKING_SERVER = textwrap.dedent(
    """
    import sys, time
    from loc3r.serve import worker

    def answer(self, question, waited):
        question.emit("token", "thinking")
        time.sleep(60)

    worker.ModelWorker._answer = answer
    from loc3r.serve.cli import console_main
    sys.argv[0] = "loc3r-serve"
    console_main()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_info() -> ModelInfo:
    return ModelInfo("loc3r-tiny-random-v1", "abc", random_weights=True, localization="trained", backend="torch")


def test_the_banner_names_model_url_media_and_policy(tmp_path: Path) -> None:
    settings = ServeSettings(media_dir=tmp_path, port=8123, max_frames=32)
    lines = banner(tiny_info(), settings, MediaListing(["a.mp4", "b/c.mkv"], None))
    assert lines[0] == "model     loc3r-tiny-random-v1 (torch, float32 on cpu, 3D encoder cut3r)"
    assert lines[1].strip().startswith("RANDOM WEIGHTS: model loc3r-tiny-random-v1 has RANDOM weights")
    assert lines[2] == "page      http://127.0.0.1:8123/   (OpenAI-compatible API: http://127.0.0.1:8123/v1/chat/completions)"
    assert lines[3] == f"media     {tmp_path.resolve()} (2 video(s) listed)"
    assert lines[4] == "access    this machine only (loopback); API key: none"
    assert "remote video URLs: off" in lines[6]

    open_settings = ServeSettings(host="0.0.0.0", api_key="k", allowed_hosts=("cam.local",), allow_remote_urls=True, max_frames=8)
    trained = ModelInfo("m", "c", random_weights=False, localization="trained", backend="onnxruntime")
    lines = banner(trained, open_settings, None)
    assert not any("RANDOM" in line for line in lines)
    assert "media     none: clients upload videos (POST /v1/videos)" in lines
    assert "access    the network (0.0.0.0); API key: required (Authorization: Bearer KEY)" in lines
    assert any(line.startswith("policy    Host header: cam.local;") for line in lines)
    assert any(line.endswith("remote video URLs: on, public addresses only") for line in lines)
    bounded = banner(tiny_info(), settings, MediaListing([], "listing stopped: more than 5000 files in the media folder"))
    assert bounded[3].endswith("(0 video(s) listed; listing stopped: more than 5000 files in the media folder)")


def test_ctrl_c_stops_the_server_within_2_s_with_a_question_running(tmp_path: Path) -> None:
    write_demo_video(tmp_path / "videos" / "room.mp4", num_frames=8, width=64, height=48)
    port = free_port()
    env = {**os.environ, "LOC3R_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-c", BLOCKING_SERVER, "--model", "tiny", "--media-dir", str(tmp_path / "videos"), "--port", str(port)]
    server = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.poll() is not None else "no start"
            try:
                httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        answering = threading.Event()

        def ask() -> None:
            body = {"model": "loc3r", "stream": True, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": "room.mp4"}}, {"type": "text", "text": "Where am I?"}]}]}
            try:
                with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
                    for line in response.iter_lines():
                        if "thinking" in line:
                            answering.set()
            except httpx.HTTPError:
                pass  # the server went away mid-answer: expected

        threading.Thread(target=ask, daemon=True).start()
        assert answering.wait(60), "the question never started"
        sent = time.monotonic()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    err = server.stderr.read()
    assert took < 2.0, f"stopped {took:.2f} s after Ctrl-C"
    assert server.returncode in (0, 130), err
    banner_lines = [line for line in err.splitlines() if line.startswith("loc3r-serve: ") and " load" not in line]
    assert banner_lines[0].startswith("loc3r-serve: model     loc3r-tiny-random-v1 (torch")
    assert "RANDOM WEIGHTS" in banner_lines[1]
    assert f"loc3r-serve: page      {base}/" in err and "(1 video(s) listed)" in err
    assert "Traceback" not in err
