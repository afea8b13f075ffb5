"""loc3r-serve over real HTTP on 127.0.0.1: the official openai client, streaming, pose,
sessions, uploads, limits, path escapes, 429s under a burst, cancellation, live sources."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import chat_body, metric, static_http, tiny_pipeline, video_message

from loc3r.runtime.demo_video import write_demo_video
from loc3r.runtime.generate import SamplingConfig
from loc3r.runtime.result import Answer
from loc3r.serve.cli import main as serve_main
from loc3r.serve.server import build_server, running
from loc3r.serve.settings import ServeSettings

FRAMES = 3
SAMPLING = SamplingConfig(max_new_tokens=6)
MAX_UPLOAD = 300_000
LONG_ANSWER = 10_000  # tokens: a question the client abandons long before its end (even on a fast machine)
LIVE_STRIDE, LIVE_FRAMES = 3, 4  # live sources read at most --max-frames frames


@dataclass
class Served:
    url: str
    reference: Answer  # "Where am I?" on room.mp4, FRAMES frames, asked of the pipeline directly
    media: Path

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def post(self, body: dict, timeout: httpx.Timeout | float = 60) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=timeout)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


def demo(path: Path, frames: int) -> Path:
    return write_demo_video(path, num_frames=frames, width=160, height=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp("serve")
    media = root / "media"
    demo(media / "room.mp4", 20)
    demo(media / "sub" / "hall.mp4", 16)
    demo(media / "burst.mp4", 18)
    demo(media / "long.mp4", 14)
    (media / "link_out.mp4").symlink_to(demo(root / "outside" / "secret.mp4", 12))
    demo(root / "live" / "live.mp4", 20)
    pipeline = tiny_pipeline()
    reference = pipeline.ask(media / "room.mp4", "Where am I?", sampling=SAMPLING, num_frames=FRAMES)  # video + question together
    pipeline.forget_video()
    with static_http(root / "live") as live_url:
        settings = ServeSettings(
            media_dir=media, upload_dir=root / "uploads", max_upload_bytes=MAX_UPLOAD, max_frames=LIVE_FRAMES,
            max_new_tokens=LONG_ANSWER, queue_size=2, live_sources={"cam": f"{live_url}/live.mp4"}, live_stride=LIVE_STRIDE,
        )
        with running(build_server(pipeline, settings)) as url:
            yield Served(url, reference, media)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["type"] and error["message"] and "\n" not in error["message"]
    return error


# -- the openai client ------------------------------------------------------------------------


def test_openai_client_gets_the_pipelines_answer_and_the_pose(served: Served) -> None:
    completion = served.client().chat.completions.create(
        model="loc3r", messages=video_message("room.mp4", "Where am I?"), max_tokens=6, extra_body={"loc3r": {"frames": FRAMES}}
    )
    reference = served.reference
    assert completion.choices[0].message.content == reference.text
    assert completion.choices[0].finish_reason == ("length" if len(reference.token_ids) == 6 else "stop")
    assert completion.usage.completion_tokens == len(reference.token_ids)
    extension = completion.to_dict()["loc3r"]
    expected = reference.to_dict()
    for part in ("position", "orientation"):
        assert extension[part] == pytest.approx(expected[part], abs=1e-6)
    assert extension["timings"].keys() == expected["timings"].keys()  # passed through as the runtime reports them
    assert extension["video"]["source"] == "room.mp4"  # the client's name, not the server's path
    assert extension["video"]["frames"] == FRAMES
    assert extension["model"]["random_weights"] is True and "RANDOM" in extension["warning"]
    assert extension["server"]["queue_wait_s"] >= 0


def test_openai_client_streams_tokens_then_the_pose(served: Served) -> None:
    stream = served.client().chat.completions.create(
        model="loc3r-tiny-random-v1", messages=video_message("room.mp4", "Where am I?"), max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"loc3r": {"frames": FRAMES}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == served.reference.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    extension = finals[0].to_dict()["loc3r"]
    assert extension["position"]["x"] == pytest.approx(served.reference.pose.x, abs=1e-6)
    assert extension["orientation"]["theta_rad"] == pytest.approx(served.reference.pose.theta_rad, abs=1e-6)
    assert extension["server"]["session"] == "kept"  # the previous test opened it
    assert chunks[-1].usage.completion_tokens == len(served.reference.token_ids)


def test_follow_up_reuses_the_video_and_a_reclaimed_one_answers_the_same(served: Served, record_property) -> None:  # noqa: ANN001
    body = chat_body("sub/hall.mp4", "What is on my left?", max_tokens=4, loc3r={"frames": FRAMES})
    first = served.post(body).json()["loc3r"]["server"]
    follow = served.post(body).json()
    assert (first["session"], follow["loc3r"]["server"]["session"]) == ("opened", "kept")
    ratio = follow["loc3r"]["server"]["ttft_s"] / first["ttft_s"]
    record_property("follow_up_over_first_ttft", ratio)
    print(f"\nserver TTFT: first {first['ttft_s']:.3f} s, follow-up {follow['loc3r']['server']['ttft_s']:.4f} s, ratio {ratio:.4f}")
    served.post(chat_body("room.mp4", "Where am I?", max_tokens=2, loc3r={"frames": FRAMES}))  # takes the LLM cache
    back = served.post(body).json()
    assert back["loc3r"]["server"]["session"] == "reclaimed"
    assert back["choices"][0]["message"]["content"] == follow["choices"][0]["message"]["content"]
    assert back["loc3r"]["position"] == pytest.approx(follow["loc3r"]["position"], abs=1e-5)
    assert metric(served.metrics(), "loc3r_session_reclaims_total") >= 1


def test_layout_points_on_request(served: Served) -> None:
    body = chat_body("room.mp4", "Where am I?", max_tokens=1, loc3r={"frames": FRAMES, "bev": True})
    points = served.post(body).json()["loc3r"]["bev_points"]
    assert len(points) > 0 and all(len(p) == 2 for p in points)
    assert "bev_points" not in served.post({**body, "loc3r": {"frames": FRAMES}}).json()["loc3r"]


# -- uploads ------------------------------------------------------------------------------------


def test_upload_then_ask_about_it(served: Served) -> None:
    data = (served.media / "room.mp4").read_bytes()
    response = httpx.post(f"{served.url}/v1/videos", files={"file": ("clip.mp4", data, "video/mp4")}, timeout=30)
    assert response.status_code == 201, response.text
    info = response.json()
    assert re.fullmatch(r"vid_[0-9a-f]{24}", info["id"]) and info["bytes"] == len(data) and info["frames"] == 20
    listed = httpx.get(f"{served.url}/v1/videos", timeout=10).json()["data"]
    assert info["id"] in {v["id"] for v in listed}
    assert httpx.get(f"{served.url}/v1/videos/{info['id']}", timeout=10).json()["filename"] == "clip.mp4"
    content = httpx.get(f"{served.url}/v1/videos/content", params={"url": info["id"]}, timeout=10)
    assert content.content == data
    answer = served.post(chat_body(info["id"], "Where am I?", max_tokens=6, loc3r={"frames": FRAMES})).json()
    assert answer["choices"][0]["message"]["content"] == served.reference.text  # same bytes, same answer


def test_upload_limits_and_bad_files(served: Served) -> None:
    url = f"{served.url}/v1/videos"
    too_big = b"\0" * (MAX_UPLOAD + 100_000)
    assert_error(httpx.post(url, files={"file": ("big.mp4", too_big)}, timeout=30), 413, "body_too_large")

    def chunked():  # no Content-Length: the limit holds while the body streams in
        boundary = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.mp4\"\r\n\r\n"
        yield boundary
        for _ in range(8):
            yield b"\1" * 50_000
        yield b"\r\n--xyz--\r\n"

    streamed = httpx.post(url, content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}, timeout=30)
    assert_error(streamed, 413, "body_too_large")
    assert_error(httpx.post(url, files={"file": ("notes.mp4", b"not a video at all")}, timeout=30), 400, "invalid_video")
    assert_error(httpx.post(url, files={"other": ("a.mp4", b"x")}, timeout=30), 400, "invalid_upload")
    assert_error(httpx.get(f"{url}/vid_{'0' * 24}", timeout=10), 404, "video_not_found")
    assert not list((served.media.parent / "uploads").glob(".vid_*"))  # no half-written file left


# -- limits and refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"loc3r": {"frames": 5}}, 400, "frames_limit"),
        ({"max_tokens": LONG_ANSWER + 1}, 400, "max_tokens_limit"),
        ({"model": "gpt-4o"}, 404, "model_not_found"),
        ({"n": 2}, 400, "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
        ({"messages": [{"role": "system", "content": "be brief"}, *video_message("room.mp4", "Where?")]}, 400, "unsupported_message"),
        ({"messages": [{"role": "user", "content": "Where am I?"}]}, 400, "video_required"),
        ({"seed": 2**64}, 400, "invalid_input"),  # markup such as <|im_end|> is plain text: accepted
        ({"messages": video_message("room.mp4", "  ")}, 400, "invalid_input"),
        ({"messages": video_message("nowhere.mp4", "Where?")}, 404, "video_not_found"),
        ({"temperature": 5}, 400, "invalid_request"),
        ({"loc3r": {"frames": 2, "colour": "red"}}, 400, "invalid_request"),
    ],
)
def test_limits_and_bad_requests_are_4xx_in_openai_format(served: Served, change: dict, status: int, code: str) -> None:
    body = {**chat_body("room.mp4", "Where am I?", max_tokens=2), **change}
    assert_error(served.post(body), status, code)


def test_oversized_json_body_is_413(served: Served) -> None:
    body = chat_body("room.mp4", "Where am I?", loc3r={"situation": "x" * 1_100_000})
    assert_error(served.post(body), 413, "body_too_large")


def test_openai_client_raises_on_a_limit(served: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="frames"):
        served.client().chat.completions.create(model="loc3r", messages=video_message("room.mp4", "Hi"), extra_body={"loc3r": {"frames": 99}})


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("../outside/secret.mp4", 403, "path_outside_media"),
        ("sub/../../outside/secret.mp4", 403, "path_outside_media"),
        ("/etc/passwd", 403, "path_outside_media"),
        ("link_out.mp4", 403, "path_outside_media"),
        ("file:///etc/passwd", 403, "url_scheme_refused"),
        ("FILE:/etc/passwd", 403, "url_scheme_refused"),
        ("http://127.0.0.1:9/x.mp4", 403, "remote_urls_disabled"),
        ("sub", 400, "invalid_video_url"),
    ],
)
def test_video_urls_cannot_leave_the_media_folder(served: Served, url: str, status: int, code: str) -> None:
    assert_error(served.post(chat_body(url, "Where am I?", max_tokens=2)), status, code)
    content = httpx.get(f"{served.url}/v1/videos/content", params={"url": url}, timeout=10)
    assert_error(content, *((400, "no_content") if ":" in url else (status, code)))


def test_only_videos_are_served_from_the_media_folder(served: Served) -> None:
    (served.media / "notes.txt").write_text("private")
    content = httpx.get(f"{served.url}/v1/videos/content", params={"url": "notes.txt"}, timeout=10)
    assert_error(content, 403, "not_a_video")
    video = httpx.get(f"{served.url}/v1/videos/content", params={"url": "sub/hall.mp4"}, timeout=10)
    assert video.content == (served.media / "sub" / "hall.mp4").read_bytes()


def test_listing_shows_media_videos_but_not_links_out(served: Served) -> None:
    listed = {v["id"]: v["source"] for v in httpx.get(f"{served.url}/v1/videos", timeout=10).json()["data"]}
    assert {"room.mp4": "media", "sub/hall.mp4": "media", "live:cam": "live"}.items() <= listed.items()
    assert "link_out.mp4" not in listed


def test_api_key_is_required_off_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--api-key" in err


def test_a_missing_serve_extra_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loc3r.serve.cli.SERVE_MODULES", ("fastapi", "no_such_module_loc3r"))
    assert serve_main([]) == 2
    assert capsys.readouterr().err == (
        "loc3r-serve: error: loc3r-serve needs no_such_module_loc3r, which is not installed: pip install 'loc3r[serve]'\n"
    )


def test_dtype_is_chosen_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``loc3r-serve --dtype`` loads the model as ``loc3r-run --dtype`` does; /health says what ran and why."""
    seen: list[dict] = []

    def serve_forever(server: object, log_level: str) -> None:
        with running(server) as url:
            seen.append(httpx.get(f"{url}/health", timeout=10).json()["model"])

    monkeypatch.setattr("loc3r.serve.server.serve_forever", serve_forever)
    assert serve_main(["--dtype", "bfloat16", "--no-cache", "--upload-dir", str(tmp_path), "--port", "0"]) == 0
    assert [(m["dtype"], m["dtype_reason"]) for m in seen] == [("bfloat16", "--dtype bfloat16")]


def test_api_key_is_checked_when_set(tmp_path: Path) -> None:
    server = build_server(tiny_pipeline(), ServeSettings(api_key="s3cret", upload_dir=tmp_path))
    with running(server) as url:
        assert_error(httpx.get(f"{url}/v1/models", timeout=10), 401, "invalid_api_key")
        assert_error(httpx.get(f"{url}/metrics", timeout=10), 401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0).models.list()
        assert [m.id for m in models.data] == ["loc3r-tiny-random-v1"]
        assert httpx.get(f"{url}/health", timeout=10).json()["auth"] is True


# -- load: 429s and cancellation -------------------------------------------------------------------


def test_a_burst_beyond_the_queue_gets_429_with_retry_after(served: Served) -> None:
    rejected_before = metric(served.metrics(), "loc3r_rejected_total")
    body = chat_body("burst.mp4", "Where am I?", max_tokens=4)  # a new video: the first question opens it (slow)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: served.post(body), range(8)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses  # nothing lost: every request answered or told to retry
    busy = [r for r in responses if r.status_code == 429]
    assert busy and statuses.count(200) >= 3, statuses  # one in progress + a queue of 2 always fit
    for response in busy:
        assert_error(response, 429, "queue_full")
        assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert metric(served.metrics(), "loc3r_rejected_total") - rejected_before == len(busy)


def wait_for_metric(served: Served, name: str, value: float, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(served.metrics(), name) < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.1)


def test_a_client_that_disconnects_cancels_its_generation(served: Served) -> None:
    short = chat_body("long.mp4", "Describe the room.", max_tokens=6, loc3r={"frames": FRAMES})
    before_answer = served.post(short).json()["choices"][0]["message"]["content"]
    figures = served.metrics()
    cancelled, tokens = metric(figures, "loc3r_cancelled_total"), metric(figures, "loc3r_generated_tokens_total")
    body = {**short, "max_tokens": LONG_ANSWER, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as response:
        received = 0
        for line in response.iter_lines():
            received += '"content":"' in line and '"content":""' not in line
            if received == 3:
                break  # leaving the block closes the connection
    wait_for_metric(served, "loc3r_cancelled_total", cancelled + 1)
    generated = metric(served.metrics(), "loc3r_generated_tokens_total") - tokens
    assert 3 <= generated < LONG_ANSWER, generated

    with pytest.raises(httpx.ReadTimeout):  # a non-streamed question whose client gives up
        served.post({**short, "max_tokens": LONG_ANSWER}, timeout=httpx.Timeout(60, read=0.5))
    wait_for_metric(served, "loc3r_cancelled_total", cancelled + 2)
    after = served.post(short).json()
    assert after["choices"][0]["message"]["content"] == before_answer  # the KV cache was cut back
    assert after["loc3r"]["server"]["session"] == "kept"


# -- health, metrics, live --------------------------------------------------------------------------


def test_health_and_metrics(served: Served) -> None:
    health = httpx.get(f"{served.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"]["id"] == "loc3r-tiny-random-v1"
    assert health["queue"]["capacity"] == 2 and "RANDOM" in health["warning"]
    served.post(chat_body("room.mp4", "Where am I?", max_tokens=2, loc3r={"frames": FRAMES}))
    figures = served.metrics()
    assert metric(figures, "loc3r_time_to_first_token_seconds_count") >= 1
    assert metric(figures, "loc3r_queue_wait_seconds_count") >= metric(figures, "loc3r_time_to_first_token_seconds_count")
    assert 'loc3r_requests_total{route="/v1/chat/completions",status="200"}' in figures
    assert "loc3r_queue_wait_seconds_bucket" in figures and "loc3r_time_to_first_token_seconds_bucket" in figures


def test_live_source_answers_from_the_frames_that_arrived(served: Served) -> None:
    body = chat_body("live:cam", "Where am I?", max_tokens=3)
    deadline = time.monotonic() + 60
    seen: list[int] = []
    while True:
        response = served.post(body)
        if response.status_code == 503:
            assert_error(response, 503, "live_source_warming_up")
            assert response.headers["Retry-After"] == "1"
        else:
            assert response.status_code == 200, response.text
            video = response.json()["loc3r"]["video"]
            seen.append(video["frames"])
            if video["frames"] == LIVE_FRAMES:
                break
        assert time.monotonic() < deadline, f"the live source never delivered {LIVE_FRAMES} frames (saw {seen})"
        time.sleep(0.2)
    assert video["indices"] == [LIVE_STRIDE * i for i in range(LIVE_FRAMES)]
    assert video["source"] == "live:cam"
    assert seen == sorted(seen)  # answers grow with the frames that arrived
    assert_error(served.post(chat_body("live:door", "Where?", max_tokens=2)), 404, "live_source_not_found")
