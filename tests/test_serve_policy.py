"""The request policy of loc3r-serve, over real HTTP on 127.0.0.1: cross-site and rebinding
requests refused, CORS for allowed origins (preflight included), the API key on every route
but the page and /health, content types, request smuggling, media types and nosniff."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serve_helpers import chat_body, tiny_pipeline

from loc3r.runtime.demo_video import write_demo_video
from loc3r.serve.origins import HostRule, origin_key, same_origin
from loc3r.serve.server import build_server, running
from loc3r.serve.settings import ServeSettings

EVIL = "http://evil.example"
APP = "http://app.example:5173"
KEY = "k3y-for-tests"


@dataclass
class Site:
    url: str
    port: int
    uploads: Path

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: object) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def log_records() -> Records:
    """Everything uvicorn (which does not propagate to the root logger) and loc3r log."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "loc3r")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def serve(root: Path, **settings: object):  # noqa: ANN201 - a context manager yielding a Site
    media = root / "media"
    if not media.exists():
        write_demo_video(media / "room.mp4", num_frames=6, width=96, height=72)
        (media / "clip.webm").write_bytes((media / "room.mp4").read_bytes())  # the type follows the name
    server = build_server(tiny_pipeline(), ServeSettings(media_dir=media, upload_dir=root / "uploads", max_frames=2, **settings))
    return running(server)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, log_records: Records) -> Site:
    root = tmp_path_factory.mktemp("policy")
    with serve(root) as url:
        yield Site(url, int(url.rsplit(":", 1)[1]), root / "uploads")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, log_records: Records) -> Site:
    root = tmp_path_factory.mktemp("keyed")
    with serve(root, api_key=KEY, cors_origins=(APP,)) as url:
        yield Site(url, int(url.rsplit(":", 1)[1]), root / "uploads")


def assert_refused(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["type"] and error["message"] and "\n" not in error["message"]
    assert_safety_headers(response)
    return error


def assert_safety_headers(response: httpx.Response) -> None:
    """Every response: no type sniffing, and never shown in another page's frame (clickjacking)."""
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["content-security-policy"] == "frame-ancestors 'none'"


VIDEO_FORM = {"file": ("v.mp4", b"\0" * 64, "video/mp4")}
JSON = {"Content-Type": "application/json"}
WRONG_MODEL = chat_body("room.mp4", "Where am I?", model="gpt-x")  # passes the policy, then refused by the route: 404


# (method, path, headers, body, status, code): what a hostile page or a rebinding DNS name sends
CROSS_SITE = [
    ("GET", "/v1/videos", {"Host": "rebind.evil.example"}, {}, 403, "host_not_allowed"),
    ("GET", "/v1/videos/content?url=room.mp4", {"Host": "rebind.evil.example:{port}"}, {}, 403, "host_not_allowed"),
    ("GET", "/health", {"Host": "127.0.0.1.nip.io"}, {}, 403, "host_not_allowed"),
    ("GET", "/", {"Host": "localhost.evil.example"}, {}, 403, "host_not_allowed"),
    ("GET", "/v1/videos", {"Host": "10.0.0.5:{port}"}, {}, 403, "host_not_allowed"),  # an address the server is not bound to
    ("GET", "/v1/videos", {"Host": "user@localhost"}, {}, 403, "host_not_allowed"),
    ("POST", "/v1/chat/completions", {"Origin": EVIL, "Content-Type": "text/plain"}, {"json_text": WRONG_MODEL}, 403, "origin_not_allowed"),
    ("POST", "/v1/chat/completions", {"Origin": EVIL, **JSON}, {"json_text": WRONG_MODEL}, 403, "origin_not_allowed"),
    ("POST", "/v1/chat/completions", {"Origin": "http://127.0.0.1:1"}, {"json_text": WRONG_MODEL}, 403, "origin_not_allowed"),  # other port
    ("POST", "/v1/chat/completions", {"Origin": "null", **JSON}, {"json_text": WRONG_MODEL}, 403, "origin_not_allowed"),
    ("POST", "/v1/videos", {"Origin": EVIL}, {"files": VIDEO_FORM}, 403, "origin_not_allowed"),
    ("POST", "/v1/videos", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, {"files": VIDEO_FORM}, 403, "cross_site_refused"),
    ("GET", "/v1/videos/content?url=room.mp4", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, {}, 403, "cross_site_refused"),
    ("GET", "/v1/videos", {"Origin": EVIL}, {}, 403, "origin_not_allowed"),
    ("POST", "/v1/chat/completions", {"Content-Type": "text/plain"}, {"json_text": WRONG_MODEL}, 415, "unsupported_content_type"),
    ("POST", "/v1/chat/completions", {"Content-Type": "application/x-www-form-urlencoded"}, {"json_text": WRONG_MODEL}, 415, "unsupported_content_type"),
    ("POST", "/v1/chat/completions", {}, {"files": VIDEO_FORM}, 415, "unsupported_content_type"),
    ("POST", "/v1/chat/completions", {"Content-Type": ""}, {"json_text": WRONG_MODEL}, 415, "unsupported_content_type"),
    ("POST", "/v1/videos", JSON, {"json_text": {"file": "x"}}, 415, "unsupported_content_type"),
    ("PUT", "/v1/videos", {"Content-Type": "text/plain"}, {"json_text": {}}, 415, "unsupported_content_type"),
    # the page in another site's frame (clickjacking), and header spellings a rule must not miss
    ("GET", "/", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}, {}, 403, "cross_site_refused"),
    ("GET", "/", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "frame"}, {}, 403, "cross_site_refused"),
    ("GET", "/v1/videos/content?url=room.mp4", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "embed"}, {}, 403, "cross_site_refused"),
    ("GET", "/v1/videos", {"Sec-Fetch-Site": "Cross-Site", "Sec-Fetch-Mode": "cors"}, {}, 403, "cross_site_refused"),
    ("POST", "/v1/chat/completions", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", **JSON}, {"json_text": WRONG_MODEL}, 403, "cross_site_refused"),
    ("GET", "/v1/videos", {"Host": "[::ffff:127.0.0.1]:{port}"}, {}, 403, "host_not_allowed"),
    ("GET", "/v1/videos", {"Host": "0.0.0.0:{port}"}, {}, 403, "host_not_allowed"),
    ("GET", "/v1/videos", {"Host": "2130706433:{port}"}, {}, 403, "host_not_allowed"),
    ("GET", "/v1/videos", {"Host": "foo.localhost:{port}"}, {}, 403, "host_not_allowed"),
    ("GET", "/v1/videos", {"Origin": "http://127.0.0.1:{port}/x"}, {}, 403, "origin_not_allowed"),
    ("GET", "/v1/videos", {"Origin": "http://127.0.0.1:{port}.evil.example"}, {}, 403, "origin_not_allowed"),
    ("GET", "/v1/videos", {"Origin": ""}, {}, 403, "origin_not_allowed"),
    ("POST", "/v1/chat/completions", {"Content-Type": "application/json-patch+json"}, {"json_text": WRONG_MODEL}, 415, "unsupported_content_type"),
    ("POST", "/v1/chat/completions", {"Content-Type": "text/plain; application/json"}, {"json_text": WRONG_MODEL}, 415, "unsupported_content_type"),
]

# requests the server's own page, a local client or a followed link send: let through
SAME_SITE = [
    ("POST", "/v1/chat/completions", {"Origin": "http://127.0.0.1:{port}", **JSON}, {"json_text": WRONG_MODEL}, 404, "model_not_found"),
    ("POST", "/v1/chat/completions", {"Origin": "http://localhost:{port}", "Host": "localhost:{port}", **JSON}, {"json_text": WRONG_MODEL}, 404, "model_not_found"),
    ("POST", "/v1/chat/completions", {"Content-Type": "application/json; charset=utf-8"}, {"json_text": WRONG_MODEL}, 404, "model_not_found"),
    ("POST", "/v1/chat/completions", {"Host": "[::1]:{port}", "Sec-Fetch-Site": "same-origin", **JSON}, {"json_text": WRONG_MODEL}, 404, "model_not_found"),
    ("GET", "/v1/videos/vid_000000000000000000000000", {"Host": "127.0.0.2"}, {}, 404, "video_not_found"),
    ("GET", "/", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}, {}, 200, None),  # a link to the page
    ("GET", "/", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}, {}, 200, None),
    ("GET", "/v1/videos", {"Host": "LOCALHOST.:{port}", "Origin": "HTTP://localhost.:{port}"}, {}, 200, None),
    ("POST", "/v1/chat/completions", {"Content-Type": "APPLICATION/JSON ; charset=utf-8"}, {"json_text": WRONG_MODEL}, 404, "model_not_found"),
    ("GET", "/health", {"Host": "localhost"}, {}, 200, None),
    ("DELETE", "/v1/videos", {}, {}, 405, "method_not_allowed"),  # no body: no content type to check
]


def send(site: Site, method: str, path: str, headers: dict[str, str], body: dict) -> httpx.Response:
    headers = {name: value.format(port=site.port) for name, value in headers.items()}
    if "json_text" in body:
        return site.request(method, path, headers, content=json.dumps(body["json_text"]).encode())
    return site.request(method, path, headers, **body)


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "code"), CROSS_SITE + SAME_SITE)
def test_cross_site_and_rebinding_requests_are_refused(
    site: Site, method: str, path: str, headers: dict, body: dict, status: int, code: str | None
) -> None:
    response = send(site, method, path, headers, body)
    if code is None:
        assert response.status_code == status, response.text
        assert_safety_headers(response)
    else:
        assert_refused(response, status, code)
    assert "access-control-allow-origin" not in response.headers  # no --cors-origin: no CORS at all
    assert not list(site.uploads.glob("vid_*"))  # nothing refused was stored


def test_refusals_name_the_fix(site: Site) -> None:
    host = assert_refused(site.request("GET", "/v1/videos", {"Host": "rebind.evil.example"}), 403, "host_not_allowed")
    assert "--allowed-host" in host["message"] and "rebind.evil.example" in host["message"]
    origin = assert_refused(site.request("GET", "/v1/videos", {"Origin": EVIL}), 403, "origin_not_allowed")
    assert "--cors-origin" in origin["message"] and EVIL in origin["message"]
    kind = assert_refused(site.request("POST", "/v1/chat/completions", {"Content-Type": "text/plain"}, content=b"{}"), 415, "unsupported_content_type")
    assert kind["message"] == "POST /v1/chat/completions takes Content-Type: application/json (got Content-Type 'text/plain')"


def test_two_files_in_one_upload_is_invalid_upload(site: Site) -> None:
    files = [("file", ("a.mp4", b"\0" * 10)), ("file", ("b.mp4", b"\0" * 10))]
    error = assert_refused(site.request("POST", "/v1/videos", files=files), 400, "invalid_upload")
    assert "one file" in error["message"]


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/v1/videos", "/v1/videos/content?url=room.mp4", "/v1/scenes", "/", "/app.js"])
def test_head_answers_every_read_route_as_get_does(site: Site, path: str) -> None:
    got, head = site.request("GET", path), site.request("HEAD", path)
    assert head.status_code == got.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert_safety_headers(head)


def test_media_is_served_with_its_video_type_and_nosniff(site: Site) -> None:
    for name, media_type in (("room.mp4", "video/mp4"), ("clip.webm", "video/webm")):
        response = site.request("GET", "/v1/videos/content", params={"url": name})
        assert response.status_code == 200
        assert response.headers["content-type"] == media_type
        assert response.headers["x-content-type-options"] == "nosniff"


def test_client_mistakes_leave_no_traceback_in_the_log(site: Site, log_records: Records) -> None:
    for method, path, headers, body, _, _ in CROSS_SITE:
        send(site, method, path, headers, body)
    site.request("POST", "/v1/videos", files=[("file", ("a.mp4", b"1")), ("file", ("b.mp4", b"2"))])
    site.request("POST", "/v1/chat/completions", JSON, content=b"\xff\xfe{not json")
    site.request("GET", "/v1/videos/content", params={"url": "../../etc/passwd"})
    site.request("POST", "/v1/chat/completions", JSON, content=b"[" * 1_200_000)  # 413 while the body streams in
    site.request("POST", "/v1/chat/completions", JSON, content=json.dumps(chat_body("room.mp4", "q", max_tokens=10**9)).encode())
    site.request("POST", "/v1/videos", {"Content-Type": "multipart/form-data"}, content=b"no boundary")
    noisy = [r for r in log_records.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not noisy, [r.getMessage() for r in noisy]


# -- the API key and CORS ------------------------------------------------------------------------

BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        ("GET", "/v1/models", {}, 401, "invalid_api_key"),
        ("GET", "/v1/models", {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
        ("GET", "/v1/models", {"Authorization": KEY}, 401, "invalid_api_key"),
        ("GET", "/v1/models", {"Authorization": f"Bearer {KEY}x"}, 401, "invalid_api_key"),
        ("GET", "/v1/videos/content?url=room.mp4", {}, 401, "invalid_api_key"),
        ("GET", "/metrics", {}, 401, "invalid_api_key"),
        ("GET", "/v1/any-future-route", {}, 401, "invalid_api_key"),  # every route is keyed unless it is the page's
        ("POST", "/health", {}, 401, "invalid_api_key"),  # only reading /health is public
        ("GET", "/v1/models?api_key=" + KEY, {}, 401, "invalid_api_key"),  # never in a URL (logs, history, Referer)
        ("GET", "/v1/models", {"X-Api-Key": KEY}, 401, "invalid_api_key"),
        ("GET", "/v1/models", {"Authorization": f"Basic {KEY}"}, 401, "invalid_api_key"),
        ("GET", "/v1/models", {"Authorization": f"Bearer{KEY}"}, 401, "invalid_api_key"),
        ("HEAD", "/v1/models", {}, 401, None),
        ("GET", "/health/", {}, 401, "invalid_api_key"),  # public is the exact path only
        ("GET", "/v1/models", BEARER, 200, None),
        ("GET", "/v1/models", {"Authorization": f"bearer {KEY}"}, 200, None),  # the scheme is case-insensitive (RFC 9110)
        ("GET", "/v1/models", {"Authorization": f"BEARER  {KEY}"}, 200, None),
        ("GET", "/health", {}, 200, None),
        ("GET", "/", {}, 200, None),
        ("GET", "/app.js", {}, 200, None),
    ],
)
def test_the_api_key_guards_every_route_but_the_page(keyed: Site, method: str, path: str, headers: dict, status: int, code: str | None) -> None:
    response = keyed.request(method, path, headers)
    if code is None:
        assert response.status_code == status, response.text
    elif method == "HEAD":
        assert response.status_code == status
    else:
        assert_refused(response, status, code)
        assert response.headers["www-authenticate"] == "Bearer"


def test_cors_preflight_and_answers_for_an_allowed_origin(keyed: Site) -> None:
    preflight = {"Origin": APP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = keyed.request("OPTIONS", "/v1/chat/completions", preflight)  # browsers send no key on a preflight
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == APP
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")}
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert_refused(keyed.request("OPTIONS", "/v1/chat/completions", {**preflight, "Origin": EVIL}), 403, "origin_not_allowed")

    answer = keyed.request("GET", "/v1/models", {"Origin": APP, **BEARER})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == APP
    no_key = assert_refused(keyed.request("GET", "/v1/models", {"Origin": APP}), 401, "invalid_api_key")
    assert no_key and keyed.request("GET", "/v1/models", {"Origin": APP}).headers["access-control-allow-origin"] == APP  # readable by the page
    posted = keyed.request("POST", "/v1/chat/completions", {"Origin": APP, **BEARER, **JSON}, content=b'{"model": "gpt-x", "messages": []}')
    assert posted.headers["access-control-allow-origin"] == APP and posted.status_code == 400
    plain = keyed.request("POST", "/v1/chat/completions", {"Origin": APP, **BEARER, "Content-Type": "text/plain"}, content=b"{}")
    assert_refused(plain, 415, "unsupported_content_type")


@pytest.mark.parametrize(
    ("headers", "status", "code", "allowed_origin"),
    [
        ({"Access-Control-Request-Method": "DELETE"}, 400, "cors_preflight_refused", None),
        ({"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, x-evil"}, 400, "cors_preflight_refused", None),
        ({"Access-Control-Request-Method": "POST", "Origin": "HTTP://APP.example:5173"}, 200, None, "HTTP://APP.example:5173"),  # the case a browser never sends, let in by the policy: answered alike
        ({"Access-Control-Request-Method": "POST", "Origin": EVIL}, 403, "origin_not_allowed", None),
    ],
)
def test_cors_preflights_are_answered_or_refused_as_error_objects(keyed: Site, headers: dict, status: int, code: str | None, allowed_origin: str | None) -> None:
    response = keyed.request("OPTIONS", "/v1/chat/completions", {"Origin": APP, **headers})
    if code is None:
        assert response.status_code == status and response.headers["access-control-allow-origin"] == allowed_origin
    else:
        error = assert_refused(response, status, code)
        if code == "cors_preflight_refused":
            assert error["message"].endswith("which this API does not take (methods: GET, POST, OPTIONS; headers: Authorization, Content-Type)")


@pytest.mark.parametrize(
    "headers",
    [
        b"Origin: http://127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n",
        b"Content-Type: application/json\r\nContent-Type: text/plain\r\n",
        b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
        b"Sec-Fetch-Site: same-origin\r\nsec-fetch-site: cross-site\r\n",
    ],
)
def test_a_header_the_policy_reads_sent_twice_is_refused(site: Site, headers: bytes) -> None:
    """The policy and the route could read different copies: refused, and the connection closed."""
    body = json.dumps(WRONG_MODEL).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % site.port + headers.replace(b"{port}", str(site.port).encode())
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    answered = raw_exchange(site, request)
    head, _, text = answered.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower()
    error = json.loads(text)["error"]
    assert error["code"] == "ambiguous_header" and error["message"].startswith("the request has more than one ")


def test_a_key_outside_ascii_is_compared_without_error() -> None:
    """A key with non-ASCII characters (sent as UTF-8) works; any other bytes are a 401, never a 500."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from loc3r.serve.policy import RequestPolicy

    key = "clé-ünï-☃"
    inner = Starlette(routes=[Route("/x", lambda _: PlainTextResponse("ok"))])
    client = TestClient(RequestPolicy(inner, bound_host="127.0.0.1", allowed_hosts=("testserver",), api_key=key))
    assert client.get("/x", headers=[(b"Authorization", f"Bearer {key}".encode())]).status_code == 200
    for wrong in (f"Bearer {key}".encode("latin-1", "replace"), b"Bearer \xff\xfe", "Bearer ☃".encode(), b"Bearer " + b"\x80" * 4096):
        response = client.get("/x", headers=[(b"Authorization", wrong)])
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


# -- request smuggling -------------------------------------------------------------------------------


def raw_exchange(site: Site, request: bytes) -> bytes:
    """Send ``request`` on one connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
    ],
)
def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(site: Site, framing: bytes) -> None:
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + framing + b"\r\n0\r\n\r\n"
    answered = raw_exchange(site, request + SMUGGLED)  # returns only once the server closed the connection
    assert answered.count(b"HTTP/1.1 ") == 1, answered  # the smuggled request is never answered
    head, _, body = answered.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower()
    assert b'"ambiguous_framing"' in body


def test_pipelined_requests_without_ambiguity_are_both_answered(site: Site) -> None:
    """The refusal above is the framing's, not pipelining's (the control)."""
    first = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    last = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    assert raw_exchange(site, first + last).count(b"HTTP/1.1 200 ") == 2


# -- the rules themselves -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bound", "allowed", "host", "answered"),
    [
        ("127.0.0.1", (), "127.0.0.1:8000", True),
        ("127.0.0.1", (), "localhost", True),
        ("127.0.0.1", (), "LOCALHOST.:8000", True),
        ("127.0.0.1", (), "[::1]:8000", True),
        ("127.0.0.1", (), "rebind.evil.example", False),
        ("127.0.0.1", (), "192.168.1.4", False),
        ("127.0.0.1", (), "", False),
        ("127.0.0.1", (), "localhost:99999", False),
        ("127.0.0.1", (), "a b", False),
        ("0.0.0.0", (), "192.168.1.4:8000", True),  # bound to every interface: any address literal
        ("0.0.0.0", (), "[fe80::1]:8000", True),
        ("0.0.0.0", (), "box.lan", False),  # but a name only when vouched for
        ("0.0.0.0", ("box.lan",), "BOX.lan:8000", True),
        ("0.0.0.0", (".corp.example",), "gpu1.corp.example", True),
        ("0.0.0.0", (".corp.example",), "corp.example.evil.example", False),
        ("192.168.1.4", (), "192.168.1.4", True),
        ("192.168.1.4", (), "192.168.1.5", False),
        ("box.lan", (), "box.lan:8000", True),
        ("127.0.0.1", ("*",), "anything.example", True),
        ("127.0.0.1", (), "[::ffff:127.0.0.1]:8000", False),  # forms a browser never sends for a loopback server
        ("127.0.0.1", (), "0.0.0.0:8000", False),
        ("127.0.0.1", (), "2130706433", False),
        ("127.0.0.1", (), "127.1", False),
        ("127.0.0.1", (), "0x7f.0.0.1", False),
        ("127.0.0.1", (), "[fe80::1%25lo]", False),
        ("127.0.0.1", (), "foo.localhost", False),
        ("127.0.0.1", (), "localhost:+80", False),
        ("127.0.0.1", (), "\uff4cocalhost", False),  # fullwidth l
        ("127.0.0.1", (), "127.0.0.1.:8000", True),
        ("127.0.0.1", (), "[0:0:0:0:0:0:0:1]", True),
        ("0.0.0.0", ("box.lan:8000",), "box.lan:8000", True),  # a port in --allowed-host is not part of the name
        ("0.0.0.0", ("BOX.LAN.",), "box.lan", True),
        ("127.0.0.1", ("[2001:db8::7]",), "[2001:db8:0::7]:8000", True),  # an address, in any of its spellings
        ("127.0.0.1", ("2001:db8::7",), "[2001:db8::8]:8000", False),
    ],
)
def test_host_rule(bound: str, allowed: tuple[str, ...], host: str, answered: bool) -> None:
    assert HostRule(bound, allowed).allows(host) is answered


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("http://localhost:8000", "localhost:8000", True),
        ("https://box.lan", "box.lan", True),  # a TLS proxy in front, default port
        ("http://box.lan", "box.lan:80", True),
        ("http://[::1]:8000", "[::1]:8000", True),
        ("http://127.0.0.1:8001", "127.0.0.1:8000", False),
        ("http://localhost:8000", "127.0.0.1:8000", False),  # another origin for the browser
        ("https://box.lan", "box.lan:80", False),
        ("null", "127.0.0.1:8000", False),
        ("http://evil.example/127.0.0.1:8000", "127.0.0.1:8000", False),
        ("http://user@127.0.0.1:8000", "127.0.0.1:8000", False),
    ],
)
def test_same_origin(origin: str, host: str, same: bool) -> None:
    assert same_origin(origin, host) is same


@pytest.mark.parametrize(
    ("origin", "key"),
    [("HTTP://App.Example:80", "http://app.example"), ("https://a.example:8443/", "https://a.example:8443"), ("ftp://a", None), ("a.example", None)],
)
def test_origin_key(origin: str, key: str | None) -> None:
    assert origin_key(origin) == key


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "0.0.0.0"], "loc3r-serve: error: --host 0.0.0.0 would expose the server beyond this machine without a key: "
         "pass --api-key KEY (clients then send 'Authorization: Bearer KEY'), or bind 127.0.0.1"),
        (["--host", "192.168.1.4", "--api-key", ""], "loc3r-serve: error: --host 192.168.1.4 would expose the server beyond this "
         "machine without a key: pass --api-key KEY (clients then send 'Authorization: Bearer KEY'), or bind 127.0.0.1"),
        (["--cors-origin", "evil.example"], "loc3r-serve: error: --cors-origin 'evil.example' is not an origin: give "
         "scheme://host[:port], e.g. --cors-origin http://localhost:5173"),
        (["--allowed-host", "http://box.lan"], "loc3r-serve: error: --allowed-host 'http://box.lan' is not a host name: give a name or "
         "address as clients reach the server, e.g. --allowed-host gpu-box.lan (.example.org: its subdomains)"),
        (["--allowed-host", "a b"], "loc3r-serve: error: --allowed-host 'a b' is not a host name: give a name or "
         "address as clients reach the server, e.g. --allowed-host gpu-box.lan (.example.org: its subdomains)"),
        (["--api-key", "k3y\n"], "loc3r-serve: error: --api-key has spaces at its ends or control characters, which an Authorization "
         "header cannot carry: use a key of printable characters without leading or trailing spaces"),
        (["--api-key", " k3y"], "loc3r-serve: error: --api-key has spaces at its ends or control characters, which an Authorization "
         "header cannot carry: use a key of printable characters without leading or trailing spaces"),
        (["--allow-private-urls", "10.0.0.0/33"], "loc3r-serve: error: --allow-private-urls '10.0.0.0/33' is not a network: "
         "give addresses or CIDR ranges, e.g. 192.168.1.0/24"),
    ],
)
def test_unsafe_or_malformed_settings_refuse_to_start(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from loc3r.serve.cli import main

    assert main(argv) == 2
    assert capsys.readouterr().err == message + "\n"  # one line, before any model loads


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 0\r\nContent-Length: 44\r\n",
        b"Content-Length: 0, 44\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: xchunked\r\n",
        b"Transfer-Encoding: chunked, identity\r\n",
        b"Transfer-Encoding : chunked\r\nContent-Length: 0\r\n",
        b"Content-Length: 0\r\n 44\r\n",
        b"Host: rebind.evil.example\r\nContent-Length: 0\r\n",
    ],
)
def test_other_ambiguous_framings_never_answer_a_smuggled_request(site: Site, framing: bytes) -> None:
    """Refused by uvicorn's parser itself (plain text, before the policy): one 400, then the connection closes."""
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + framing + b"\r\n0\r\n\r\n"
    answered = raw_exchange(site, request + SMUGGLED)
    assert answered.count(b"HTTP/1.1 ") == 1 and answered.startswith(b"HTTP/1.1 400 "), answered
