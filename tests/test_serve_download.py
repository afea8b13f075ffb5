"""--allow-remote-urls downloads: addresses checked after resolution and after every redirect
(the test server itself is reached by allowing exactly 127.0.0.1/32), one overall deadline
against a slow-drip server, no second lookup, network errors not echoed."""

from __future__ import annotations

import http.server
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from loc3r.runtime.demo_video import write_demo_video
from loc3r.serve.download import AddressPolicy
from loc3r.serve.errors import ApiError
from loc3r.serve.media import MediaResolver
from loc3r.serve.settings import ServeSettings
from loc3r.serve.uploads import UploadStore

ONLY_THE_TEST_SERVER = ("127.0.0.1/32",)


@contextmanager
def http_server(handle: Callable[[http.server.BaseHTTPRequestHandler], None], host: str = "127.0.0.1") -> Iterator[tuple[str, list[str]]]:
    """A server on ``host`` whose GETs ``handle`` answers; yields its base URL and the paths it was asked."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            asked.append(self.path)
            handle(self)

        def log_message(self, *args: object) -> None:
            pass

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family})((host, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{f'[{host}]' if ':' in host else host}:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def redirect_to(location: str) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def handle(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(302)
        request.send_header("Location", location.replace("{self}", f"http://{request.headers['Host']}"))
        request.send_header("Content-Length", "0")
        request.end_headers()

    return handle


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_demo_video(tmp_path_factory.mktemp("clip") / "c.mp4", num_frames=4, width=32, height=32).read_bytes()


def serve_clip(clip: bytes) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def handle(request: http.server.BaseHTTPRequestHandler) -> None:
        if request.path.startswith("/hop"):
            redirect_to("{self}/clip.mp4")(request)
            return
        request.send_response(200)
        request.send_header("Content-Type", "video/mp4")
        request.send_header("Content-Length", str(len(clip)))
        request.end_headers()
        request.wfile.write(clip)

    return handle


def resolver(tmp_path: Path, allowed: tuple[str, ...] = ONLY_THE_TEST_SERVER, timeout_s: float = 30.0) -> MediaResolver:
    settings = ServeSettings(upload_dir=tmp_path / "up", allow_remote_urls=True, allow_private_urls=allowed, remote_timeout_s=timeout_s)
    return MediaResolver(settings, UploadStore(settings.upload_dir, settings.max_upload_bytes, settings.upload_store_bytes))


def refused(resolve: MediaResolver, url: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        resolve.resolve(url)
    error = caught.value
    assert "\n" not in error.message
    return error


# -- addresses --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/a.mp4", "a loopback address"),
        ("http://localhost:9/a.mp4", "a loopback address"),
        ("http://[::1]:9/a.mp4", "a loopback address"),
        ("http://127.1:9/a.mp4", "a loopback address"),
        ("http://2130706433:9/a.mp4", "a loopback address"),  # 127.0.0.1 as one number
        ("http://[::ffff:127.0.0.1]:9/a.mp4", "a loopback address"),
        ("http://[2002:7f00:1::]:9/a.mp4", "a loopback address"),  # 6to4 around 127.0.0.1
        ("http://10.1.2.3/a.mp4", "a private address"),
        ("http://192.168.1.1/a.mp4", "a private address"),
        ("http://[64:ff9b::a01:203]/a.mp4", "a private address"),  # NAT64 around 10.1.2.3
        ("http://[fd00::1]/a.mp4", "a private address"),
        ("http://169.254.169.254/latest/meta-data/", "a link-local address"),  # cloud metadata
        ("http://[fe80::1]/a.mp4", "a link-local address"),
        ("http://0.0.0.0:9/a.mp4", "an unspecified address (0.0.0.0 or ::)"),
        ("http://224.0.0.1/a.mp4", "a multicast address"),
        ("http://240.0.0.1/a.mp4", "a reserved address"),
        ("http://100.64.0.1/a.mp4", "a non-public address"),  # carrier-grade NAT
    ],
)
def test_local_and_private_addresses_are_refused(tmp_path: Path, url: str, reason: str) -> None:
    error = refused(resolver(tmp_path, allowed=()), url)
    assert (error.status, error.code) == (403, "remote_address_refused")
    assert f"resolves to {reason}, which this server does not download from" in error.message and "--allow-private-urls" in error.message


@pytest.mark.parametrize(
    ("allowed", "address", "reachable"),
    [
        ((), "8.8.8.8", True),
        ((), "2606:4700::1111", True),
        (("192.168.1.0/24",), "192.168.1.7", True),
        (("192.168.1.0/24",), "192.168.2.7", False),
        (("192.168.1.0/24",), "::ffff:192.168.1.7", True),
        (("*",), "127.0.0.1", True),
        (("*",), "169.254.169.254", True),
        (("*",), "224.0.0.1", False),  # never: not a host
        (("*",), "0.0.0.0", False),  # never: it means this machine
        (("127.0.0.1/32",), "127.0.0.2", False),
    ],
)
def test_address_policy(allowed: tuple[str, ...], address: str, reachable: bool) -> None:
    assert (AddressPolicy(allowed).refusal(ipaddress.ip_address(address)) is None) is reachable


# -- redirects -------------------------------------------------------------------------------------------


def test_a_redirect_within_the_allowed_network_is_followed(tmp_path: Path, clip: bytes) -> None:
    """The control: the server is reachable, redirects are followed (the refusals below are the target's)."""
    with http_server(serve_clip(clip)) as (base, asked):
        ref = resolver(tmp_path).resolve(f"{base}/hop")
    assert ref.path.read_bytes() == clip and asked == ["/hop", "/clip.mp4"]


@pytest.mark.parametrize(
    ("location", "code", "status"),
    [
        ("http://127.0.0.2:{port}/clip.mp4", "remote_address_refused", 403),  # loopback, but not the allowed /32
        ("http://10.1.2.3/clip.mp4", "remote_address_refused", 403),
        ("http://169.254.169.254/latest/meta-data/", "remote_address_refused", 403),
        ("http://[::1]:{port}/clip.mp4", "remote_address_refused", 403),
        ("{self}/hop-private", "remote_address_refused", 403),  # the second redirect is checked as the first
        ("ftp://127.0.0.1/clip.mp4", "remote_redirect_refused", 403),
        ("file:///etc/passwd", "remote_redirect_refused", 403),
        ("{self}/loop", "remote_redirect_refused", 400),
        ("", "remote_redirect_refused", 400),
        ("http://[::1", "remote_redirect_refused", 400),  # malformed: refused, not an internal error
        ("http://127.0.0.2:99999/clip.mp4", "remote_redirect_refused", 400),
        ("http://[fe80::1%25lo]/clip.mp4", "remote_redirect_refused", 400),
        ("gopher://127.0.0.2:{port}/", "remote_redirect_refused", 403),
        ("//10.1.2.3/clip.mp4", "remote_address_refused", 403),  # scheme-relative
        ("http://0x0a010203/clip.mp4", "remote_address_refused", 403),  # 10.1.2.3 as one hex number
        ("http://evil@127.0.0.2:{port}/clip.mp4", "remote_address_refused", 403),  # userinfo changes nothing
    ],
)
def test_redirect_targets_are_checked(tmp_path: Path, location: str, code: str, status: int) -> None:
    with http_server(lambda request: None, host="127.0.0.2") as (target, target_asked):
        port = target.rsplit(":", 1)[1]

        def handle(request: http.server.BaseHTTPRequestHandler) -> None:
            if request.path == "/hop-private":
                redirect_to(f"http://127.0.0.2:{port}/clip.mp4")(request)
            else:
                redirect_to(location.replace("{port}", port))(request)

        with http_server(handle) as (base, asked):
            error = refused(resolver(tmp_path), f"{base}/start")
    assert (error.status, error.code) == (status, code), error.message
    assert target_asked == []  # the refused target was never connected to
    if code == "remote_address_refused":
        assert "(a redirect leads to " in error.message
    assert asked[0] == "/start"


def test_the_name_is_resolved_once_and_the_checked_address_is_used(tmp_path: Path, clip: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebinding DNS name that answers the allowed address, then a private one: no second lookup happens."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: str, *args: object, **kwargs: object) -> list:
        if host != "rebind.test":
            return real(host, *args, **kwargs)
        lookups.append(host)
        return real("127.0.0.1" if len(lookups) == 1 else "10.1.2.3", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with http_server(serve_clip(clip)) as (base, asked):
        ref = resolver(tmp_path).resolve(base.replace("127.0.0.1", "rebind.test") + "/clip.mp4")
    assert ref.path.read_bytes() == clip and lookups == ["rebind.test"] and asked == ["/clip.mp4"]


# -- the deadline and errors -----------------------------------------------------------------------------

DRIP_S = 0.25
DEADLINE_S = 1.5


def drip_body(request: http.server.BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Content-Length", "10000")
    request.end_headers()
    for _ in range(200):  # one byte at a time: every read returns, none times out
        request.wfile.write(b"\0")
        request.wfile.flush()
        time.sleep(DRIP_S)


def drip_headers(request: http.server.BaseHTTPRequestHandler) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n" + b"X-Slow: " + b"a" * 100:
        request.wfile.write(bytes([byte]))
        request.wfile.flush()
        time.sleep(DRIP_S)


@pytest.mark.parametrize("handle", [drip_body, drip_headers])
def test_one_deadline_for_the_whole_download(tmp_path: Path, handle: Callable) -> None:
    with http_server(handle) as (base, _):
        started = time.monotonic()
        error = refused(resolver(tmp_path, timeout_s=DEADLINE_S), f"{base}/slow.mp4")
        took = time.monotonic() - started
    assert (error.status, error.code) == (400, "remote_video_timeout")
    assert error.message == f"downloading {base}/slow.mp4 took longer than this server allows ({DEADLINE_S:g} s in all)"
    assert DEADLINE_S <= took < DEADLINE_S + 1.0
    assert not list((tmp_path / "up").iterdir())  # nothing half-downloaded is left


def test_network_errors_are_not_echoed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="loc3r.serve.download"):
        error = refused(resolver(tmp_path), f"http://127.0.0.1:{port}/a.mp4")
    assert (error.status, error.code) == (400, "remote_video_unavailable")
    assert error.message == f"cannot download http://127.0.0.1:{port}/a.mp4: the remote server could not be reached or broke off (the server's log says why)"
    assert any("refused" in record.getMessage().lower() for record in caplog.records)  # the detail is in the log


# -- URLs as they are sent, and the lookup ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "status", "code", "message"),
    [
        ("http://[::1/a.mp4", 400, "invalid_video_url", "http://[::1/a.mp4 is not a valid URL (Invalid IPv6 URL)"),
        ("http://a.example:99999/a.mp4", 400, "invalid_video_url", "http://a.example:99999/a.mp4 is not a valid URL (Port out of range 0-65535)"),
        ("http://[fe80::1%25eth0]/a.mp4", 400, "invalid_video_url", "http://[fe80::1%25eth0]/a.mp4 names a host with characters no host name has"),
        ("http://%31%32%37.0.0.1/a.mp4", 400, "invalid_video_url", "http://%31%32%37.0.0.1/a.mp4 names a host with characters no host name has"),
        ("http://a\u2028b.example/a.mp4", 400, "invalid_video_url", "'http://a\\u2028b.example/a.mp4' names a host that is not a valid domain name"),
        ("http://a..b.example/a.mp4", 400, "invalid_video_url", "http://a..b.example/a.mp4 names a host that is not a valid domain name"),
        ("http://127.0.0.1:9/a\r\nX-Injected: 1", 403, "remote_address_refused", None),  # one line: the URL is quoted
        ("http://" + "a" * 5000 + ".example/a.mp4", 400, "invalid_video_url", None),
    ],
)
def test_malformed_urls_are_refused_in_one_line(tmp_path: Path, url: str, status: int, code: str, message: str | None) -> None:
    error = refused(resolver(tmp_path, allowed=()), url)
    assert (error.status, error.code) == (status, code), error.message
    assert len(error.message) < 600 and error.message.isprintable()
    if message is not None:
        assert error.message == message


def recording_lookup(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]], delay_s: float = 0.0) -> list[str]:
    """``socket.getaddrinfo`` answering ``answers`` (name -> addresses, after ``delay_s``); the names asked."""
    real, asked = socket.getaddrinfo, []

    def lookup(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        time.sleep(delay_s)
        return [entry for address in answers[host] for entry in real(address, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return asked


def test_an_international_name_is_looked_up_and_sent_in_its_idna_form(tmp_path: Path, clip: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    hosts: list[str] = []

    def handle(request: http.server.BaseHTTPRequestHandler) -> None:
        hosts.append(request.headers["Host"])
        serve_clip(clip)(request)

    asked = recording_lookup(monkeypatch, {"xn--bcher-kva.test": ["127.0.0.1"]})
    with http_server(handle) as (base, paths):
        port = base.rsplit(":", 1)[1]
        ref = resolver(tmp_path).resolve(f"http://bücher.test:{port}/vidéo clip.mp4?q=ü")
    assert ref.path.read_bytes() == clip
    assert asked == ["xn--bcher-kva.test"] and hosts == [f"xn--bcher-kva.test:{port}"]
    assert paths == ["/vid%C3%A9o%20clip.mp4?q=%C3%BC"]


def test_an_ipv6_server_gets_a_bracketed_host_header(tmp_path: Path, clip: bytes) -> None:
    hosts: list[str] = []

    def handle(request: http.server.BaseHTTPRequestHandler) -> None:
        hosts.append(request.headers["Host"])
        serve_clip(clip)(request)

    with http_server(handle, host="::1") as (base, _):
        ref = resolver(tmp_path, allowed=("::1/128",)).resolve(f"{base}/clip.mp4")
    assert ref.path.read_bytes() == clip and hosts == [base.removeprefix("http://")]


@pytest.mark.parametrize(
    ("addresses", "reason"),
    [(["93.184.216.34", "10.1.2.3"], "a private address"), (["10.1.2.3", "93.184.216.34"], "a private address"), (["93.184.216.34", "::1"], "a loopback address")],
)
def test_a_name_with_one_private_address_among_public_ones_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, addresses: list[str], reason: str
) -> None:
    recording_lookup(monkeypatch, {"mixed.test": addresses})
    error = refused(resolver(tmp_path, allowed=()), "http://mixed.test/a.mp4")
    assert (error.status, error.code) == (403, "remote_address_refused") and f"resolves to {reason}" in error.message


def test_a_slow_name_server_is_cut_off_by_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lookup counts against the one deadline (asyncio.run would otherwise wait for it)."""
    recording_lookup(monkeypatch, {"slow.test": ["127.0.0.1"]}, delay_s=3 * DEADLINE_S)
    started = time.monotonic()
    error = refused(resolver(tmp_path, timeout_s=DEADLINE_S), "http://slow.test:9/a.mp4")
    assert (error.status, error.code) == (400, "remote_video_timeout")
    assert DEADLINE_S <= time.monotonic() - started < DEADLINE_S + 1.0


def test_a_failed_live_source_echoes_neither_its_url_nor_the_network_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The operator's camera URL may carry a password; the network error maps the network: both stay in the log."""
    import httpx
    from serve_helpers import chat_body, tiny_pipeline

    from loc3r.serve.server import build_server, running

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = f"http://admin:s3cret@127.0.0.1:{port}/cam"
    settings = ServeSettings(upload_dir=tmp_path / "up", max_frames=2, live_sources={"front": spec})
    with caplog.at_level(logging.WARNING, logger="loc3r.serve.live"), running(build_server(tiny_pipeline(), settings)) as url:
        deadline = time.monotonic() + 30
        while True:
            response = httpx.post(f"{url}/v1/chat/completions", json=chat_body("live:front", "Where am I?", max_tokens=2), timeout=30)
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert response.status_code == 502, response.text
    assert response.json()["error"] == {
        "message": "live source front could not be read (the server's log says why)", "type": "api_error", "code": "live_source_failed", "param": None,
    }
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "refused" in logged.lower() and f"admin:***@127.0.0.1:{port}" in logged and "s3cret" not in logged
