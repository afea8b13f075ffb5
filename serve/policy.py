"""The request policy: every request passes here before any route, present or future.

In order, a request is refused (OpenAI error object, nothing of it reaches a route) when:

1. it carries both ``Content-Length`` and ``Transfer-Encoding`` (request smuggling): 400,
   and the connection is closed so that nothing after it on that connection is read; or one
   of the headers the rules below read (``Origin``, ``Content-Type``, ``Authorization``,
   ``Sec-Fetch-*``) more than once: the rules and the route could read different ones;
2. its ``Host`` is not a name the server is reachable as (DNS rebinding): the bound
   address, a loopback address or ``localhost``, any IP address when bound to all
   interfaces, or a name given with ``--allowed-host``;
3. a web page of another origin sent it: an ``Origin`` that is not the server's own and not
   given with ``--cors-origin``, or (without ``Origin``) ``Sec-Fetch-Site: cross-site`` on
   anything but a top-level page navigation (a frame of another site's page is refused).
   Allowed origins get CORS headers and preflight answers (Starlette's ``CORSMiddleware``; a
   preflight asking for a method or header the API does not take is refused here, as an
   error object);
4. the API key is set and ``Authorization: Bearer KEY`` is missing or wrong (compared in
   constant time; the scheme's case does not matter); ``GET /health`` and the page's own
   files are public;
5. it has a body that is not ``application/json`` (``multipart/form-data`` for POSTs to
   upload routes): a browser sends a cross-site "simple" request without preflight only as
   ``text/plain``, a form or multipart.

Every response gets ``X-Content-Type-Options: nosniff`` and may not be shown in another
site's frame (``X-Frame-Options: DENY``, ``Content-Security-Policy: frame-ancestors 'none'``):
a page that frames the server's page cannot trick clicks on it (clickjacking).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loc3r.serve.errors import error_body
from loc3r.serve.origins import HostRule, origin_key, same_origin

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READ_METHODS = frozenset({"GET", "HEAD"})
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
SHOWN_CHARS = 80  # of a client's Host or Origin, in a refusal
SINGLE_HEADERS = (b"origin", b"content-type", b"authorization", b"sec-fetch-site", b"sec-fetch-mode", b"sec-fetch-dest")
CORS_METHODS = ("GET", "POST", "OPTIONS")
CORS_HEADERS = ("Authorization", "Content-Type")
# every response: no sniffing a type, no framing by another page
SAFETY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}


class Refusal(Exception):
    """A request the policy does not let through."""

    def __init__(self, status: int, message: str, code: str, close: bool = False, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.close = status, message, code, close
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        headers = {**self.headers, **({"Connection": "close"} if self.close else {})}
        return JSONResponse(error_body(self.status, self.message, self.code), status_code=self.status, headers=headers)


def shown(text: str) -> str:
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


class RequestPolicy:
    """Pure ASGI middleware applying the rules above (streaming and disconnects untouched)."""

    def __init__(
        self,
        app: ASGIApp,
        bound_host: str,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
        api_key: str | None = None,
        public_paths: Iterable[str] = (),
        upload_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.hosts = HostRule(bound_host, allowed_hosts)
        origins = list(cors_origins)
        self.any_origin = "*" in origins
        self.origins = frozenset(key for key in map(origin_key, origins) if key)
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.public = frozenset(public_paths)
        self.uploads = frozenset(upload_paths)
        self.inner: ASGIApp = self._checked
        if origins:
            # the origin was checked above (its case and a default port normalized); CORS only answers
            self.inner = CORSMiddleware(
                self._checked,
                allow_origins=["*"] if self.any_origin else [],
                allow_origin_regex=None if self.any_origin else ".*",
                allow_methods=list(CORS_METHODS),
                allow_headers=list(CORS_HEADERS),
                max_age=600,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            self._check_outer(scope, Headers(scope=scope))
        except Refusal as refusal:
            await self._refuse(refusal, scope, receive, send)
            return
        await self.inner(scope, receive, _safety_headers(send))

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Behind CORS (so refusals to an allowed origin carry its CORS headers)."""
        try:
            self._check_inner(scope, Headers(scope=scope))
        except Refusal as refusal:
            await self._refuse(refusal, scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_outer(self, scope: Scope, headers: Headers) -> None:
        if "content-length" in headers and "transfer-encoding" in headers:
            raise Refusal(
                400, "the request has both Content-Length and Transfer-Encoding (refused: request smuggling); send one of them",
                "ambiguous_framing", close=True,
            )
        names = [name.lower() for name, _ in scope["headers"]]
        for name in SINGLE_HEADERS:
            if names.count(name) > 1:
                title = "-".join(part.capitalize() for part in name.decode().split("-"))
                raise Refusal(400, f"the request has more than one {title} header; send it once", "ambiguous_header", close=True)
        host = headers.get("host")
        if host is None:
            raise Refusal(400, "the request has no Host header; send the name or address you reach the server by", "host_missing")
        if not self.hosts.allows(host):
            raise Refusal(
                403, f"Host {shown(host)} is not a name this server answers to (DNS rebinding protection); "
                "if it is yours, start the server with --allowed-host NAME", "host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None:
            if not (same_origin(origin, host) or self.any_origin or origin_key(origin) in self.origins):
                raise Refusal(
                    403, f"requests from the web page at {shown(origin)} are refused; to let that page use this server, "
                    "start it with --cors-origin ORIGIN", "origin_not_allowed",
                )
            if scope.get("method") == "OPTIONS" and "access-control-request-method" in headers:
                _check_preflight(headers)
        elif headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site") and not _navigation(scope, headers):
            raise Refusal(
                403, "a request made by another web site is refused (Sec-Fetch-Site: cross-site); "
                "to let a page use this server, start it with --cors-origin ORIGIN", "cross_site_refused",
            )

    def _check_inner(self, scope: Scope, headers: Headers) -> None:
        method, path = scope.get("method", "GET"), scope["path"]
        if self.key is not None and not (method in READ_METHODS and path in self.public):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = f"Bearer {token.strip(' ')}".encode("latin-1") if scheme.lower() == "bearer" else b""
            if not secrets.compare_digest(given, self.key):
                raise Refusal(
                    401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if method in BODY_METHODS and _has_body(headers):
            media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            wanted = MULTIPART_TYPE if method == "POST" and path in self.uploads else JSON_TYPE
            if media_type != wanted:
                got = f"Content-Type {shown(media_type)}" if media_type else "no Content-Type"
                raise Refusal(415, f"{method} {path} takes Content-Type: {wanted} (got {got})", "unsupported_content_type")

    async def _refuse(self, refusal: Refusal, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.code})
            return
        await refusal.response()(scope, receive, _safety_headers(send))


def _has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("", "0")


def _navigation(scope: Scope, headers: Headers) -> bool:
    """A top-level page load (a link to the server followed from another site), not a frame."""
    return (
        scope.get("method") in READ_METHODS
        and headers.get("sec-fetch-mode", "").lower() == "navigate"
        and headers.get("sec-fetch-dest", "document").lower() == "document"
    )


def _check_preflight(headers: Headers) -> None:
    """A preflight of an origin the server lets in, for a method and headers the API takes."""
    method = headers["access-control-request-method"].strip()
    asked = [name.strip() for name in headers.get("access-control-request-headers", "").split(",") if name.strip()]
    allowed = {name.lower() for name in CORS_HEADERS}
    extra = [name for name in asked if name.lower() not in allowed]
    if method not in CORS_METHODS or extra:
        what = f"method {shown(method)}" if method not in CORS_METHODS else f"header {shown(extra[0])}"
        raise Refusal(
            400, f"the CORS preflight asks for {what}, which this API does not take "
            f"(methods: {', '.join(CORS_METHODS)}; headers: {', '.join(CORS_HEADERS)})", "cors_preflight_refused",
        )


def _safety_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for name, value in SAFETY_HEADERS.items():
                headers.setdefault(name, value)
        await send(message)

    return sending
