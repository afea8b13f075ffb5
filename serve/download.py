"""Downloading a client's ``http(s)://`` video URL without becoming a proxy into the network.

- **Addresses are checked after resolution, on every connection**: the HTTP client's network
  backend resolves the name itself, refuses it when any address is loopback, private,
  link-local, shared, reserved, multicast or unspecified (an IPv4 address inside an IPv6 one
  included) unless the operator allowed that network (``--allow-private-urls``), and connects
  to the very address it checked (no second lookup a rebinding DNS server could answer
  differently). Redirects are followed by hand, so each one's target goes through the same
  check; only ``http``/``https``, at most ``MAX_REDIRECTS``.
- **One deadline for the whole download** (connects, redirects, headers, body): a server that
  drips one byte at a time is cut off when it passes, not when a read stalls.
- **Network errors are not echoed**: the client learns that the download failed, the log
  says why (a client could otherwise map which hosts and ports answer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from typing import BinaryIO
from urllib.parse import quote, urljoin, urlsplit

import httpcore

from loc3r.serve.errors import ApiError

log = logging.getLogger(__name__)
MAX_REDIRECTS = 5
CHUNK = 1 << 16
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressPolicy:
    """Which addresses downloads may reach: the public internet, plus networks the operator allowed."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        allowed = list(allowed)
        self.any_private = "*" in allowed
        self.networks = [ipaddress.ip_network(network, strict=False) for network in allowed if network != "*"]

    def refusal(self, address: Address) -> str | None:
        """Why ``address`` may not be reached (``"a loopback address"``...), or None."""
        if address.version == 6 and address.ipv4_mapped:  # ::ffff:a.b.c.d is a.b.c.d
            return self.refusal(address.ipv4_mapped)
        for inner in _embedded_ipv4(address):
            reason = self.refusal(inner)
            if reason:
                return reason
        if address.is_multicast or address.is_unspecified:
            return "a multicast address" if address.is_multicast else "an unspecified address (0.0.0.0 or ::)"
        if address.is_global and not address.is_reserved:
            return None
        if self.any_private or any(address in network for network in self.networks if network.version == address.version):
            return None
        if address.is_loopback:
            return "a loopback address"
        if address.is_link_local:
            return "a link-local address"
        if address.is_reserved:
            return "a reserved address"
        return "a private address" if address.is_private else "a non-public address"


def _embedded_ipv4(address: Address) -> list[Address]:
    """IPv4 addresses an IPv6 address carries on to (6to4, Teredo, NAT64)."""
    if address.version == 4:
        return []
    inner = [address.sixtofour, *(address.teredo or ())]
    if address in _NAT64:
        inner.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [ip for ip in inner if ip is not None]


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the address check between resolution and connection."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options: Iterable | None = None
    ) -> httpcore.AsyncNetworkStream:
        address = await self.checked_address(host, port)
        return await self.inner.connect_tcp(str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options)

    async def checked_address(self, host: str, port: int) -> Address:
        """The address to connect to: the first of the name's addresses, all of them checked."""
        try:
            found = await _lookup(host, port)
        except OSError as exc:
            raise DownloadFailed(f"cannot resolve {host!r}: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in found]
        for address in addresses:
            reason = self.policy.refusal(address)
            if reason:
                raise AddressRefused(host, reason)
        if not addresses:
            raise DownloadFailed(f"{host!r} has no address")
        return addresses[0]

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


async def _lookup(host: str, port: int) -> list[tuple]:
    """``getaddrinfo`` in a thread of its own that nobody joins: a name server that answers
    slowly is cut off by the download's deadline (``asyncio.run`` would wait for its default
    executor's threads, so a lookup there outlives the deadline)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[list[tuple]] = loop.create_future()

    def settle(result: list[tuple] | None, error: BaseException | None) -> None:
        if not answer.done():
            answer.set_exception(error) if error is not None else answer.set_result(result or [])

    def resolve() -> None:
        try:
            result, error = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), None
        except Exception as exc:  # noqa: BLE001 - handed to the waiting download
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the download gave up and its loop is closed: nobody waits
            pass

    threading.Thread(target=resolve, name="loc3r-dns", daemon=True).start()
    return await answer


class DownloadFailed(Exception):
    """A network failure: its detail goes to the log, never to the client."""


class AddressRefused(Exception):
    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host} resolves to {reason}")
        self.host, self.reason = host, reason


def download(url: str, out: BinaryIO, max_bytes: int, deadline_s: float, policy: AddressPolicy) -> str:
    """Write the body at ``url`` (redirects followed) to ``out`` within ``deadline_s`` seconds
    in all; return the final URL. Blocking: runs its own event loop (call it from a thread)."""
    return asyncio.run(_download(url, out, max_bytes, deadline_s, policy))


async def _download(url: str, out: BinaryIO, max_bytes: int, deadline_s: float, policy: AddressPolicy) -> str:
    try:
        async with asyncio.timeout(deadline_s), httpcore.AsyncConnectionPool(network_backend=CheckedBackend(policy)) as pool:
            return await _follow(pool, url, out, max_bytes)
    except TimeoutError:
        raise ApiError(400, f"downloading {shown(url)} took longer than this server allows ({deadline_s:g} s in all)", "remote_video_timeout") from None
    except AddressRefused as exc:
        hop = "" if exc.host == _hostname(url) else f" (a redirect leads to {exc.host})"
        raise ApiError(
            403, f"{shown(url)}{hop} resolves to {exc.reason}, which this server does not download from; "
            "the operator can allow such networks with --allow-private-urls", "remote_address_refused", "video_url",
        ) from None
    except (DownloadFailed, httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException, OSError) as exc:
        log.warning("download of %s failed: %s", shown(url), _causes(exc))
        raise ApiError(
            400, f"cannot download {shown(url)}: the remote server could not be reached or broke off (the server's log says why)",
            "remote_video_unavailable", "video_url",
        ) from None


async def _follow(pool: httpcore.AsyncConnectionPool, url: str, out: BinaryIO, max_bytes: int) -> str:
    request = request_url(url, url)
    for _ in range(MAX_REDIRECTS + 1):
        target, host = request
        async with pool.stream("GET", target, headers={"Host": host, "User-Agent": "loc3r-serve", "Accept": "video/*, */*"}) as response:
            if response.status in (301, 302, 303, 307, 308):
                location = _header(response.headers, b"location")
                if not location:
                    raise ApiError(400, f"{shown(url)} redirects without a Location", "remote_redirect_refused", "video_url")
                came_from, url = url, _joined(url, location)
                request = request_url(url, came_from)
                continue
            if response.status >= 400:
                raise ApiError(400, f"cannot download {shown(url)}: the remote server answered HTTP {response.status}", "remote_video_unavailable", "video_url")
            declared = _header(response.headers, b"content-length")
            if declared.isdigit() and int(declared) > max_bytes:
                raise too_large(max_bytes)
            size = 0
            async for block in response.aiter_stream():
                size += len(block)
                if size > max_bytes:
                    raise too_large(max_bytes)
                out.write(block)
            return url
    raise ApiError(400, f"{shown(url)} redirects more than {MAX_REDIRECTS} times", "remote_redirect_refused", "video_url")


def _causes(exc: BaseException) -> str:
    """``exc`` and what caused it ("ConnectError: All connection attempts failed <- ConnectionRefusedError: ...")."""
    chain: list[str] = []
    while exc is not None and len(chain) < 4:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(chain)


def request_url(url: str, came_from: str) -> tuple[httpcore.URL, bytes]:
    """The request for ``url`` (the client's, or a redirect's target from ``came_from``) and
    its ``Host`` header: http(s) only, a host (an international name in its IDNA form), a
    valid port, the path and query percent-encoded; anything else is refused with the reason."""
    redirect = url != came_from

    def refused(status: int, why: str, code: str) -> ApiError:
        what = f"{shown(came_from)} redirects to {shown(url)}, which" if redirect else shown(url)
        return ApiError(status, f"{what} {why}", "remote_redirect_refused" if redirect else code, "video_url")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535"
        raise refused(400, f"is not a valid URL ({exc})", "invalid_video_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise refused(403, "is not an http(s) URL", "url_scheme_refused")
    if not parts.hostname:
        raise refused(400, "names no host", "invalid_video_url")
    try:
        host = parts.hostname.encode("idna")  # an international name's ASCII form; labels of 1 to 63 characters
    except UnicodeError:
        raise refused(400, "names a host that is not a valid domain name", "invalid_video_url") from None
    if any(byte <= 0x20 or byte == 0x7F for byte in host) or b"%" in host:
        raise refused(400, "names a host with characters no host name has", "invalid_video_url")
    path = quote(parts.path or "/", safe=URL_SAFE) + (f"?{quote(parts.query, safe=URL_SAFE + '?')}" if parts.query else "")
    named = b"[" + host + b"]" if b":" in host else host
    host_header = named if port is None or port == DEFAULT_PORTS[scheme] else b"%b:%d" % (named, port)
    return httpcore.URL(scheme=scheme.encode(), host=host, port=port, target=path.encode("ascii")), host_header


URL_SAFE = "/%:@!$&'()*+,;=~-._"  # kept as they are: reserved characters and escapes already made
DEFAULT_PORTS = {"http": 80, "https": 443}
SHOWN_CHARS = 200


def shown(url: str) -> str:
    """``url`` for a one-line message: as it is when short and printable, else quoted and cut."""
    if url.isprintable() and len(url) <= SHOWN_CHARS:
        return url
    return repr(url if len(url) <= SHOWN_CHARS else url[:SHOWN_CHARS] + "...")


def _joined(base: str, location: str) -> str:
    """The redirect's target (a malformed ``Location`` is kept as it is, to be refused)."""
    try:
        return urljoin(base, location)
    except ValueError:
        return location


def _hostname(url: str) -> str | None:
    """The host a connection to ``url`` is made to (as the network backend is given it)."""
    try:
        return request_url(url, url)[0].host.decode("ascii")
    except ApiError:
        return None


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    return next((value.decode("latin-1").strip() for key, value in headers if key.lower() == name), "")


def too_large(limit: int) -> ApiError:
    size = f"{limit // (1 << 20)} MiB" if limit >= 1 << 20 else f"{limit} bytes"
    return ApiError(413, f"the video is larger than this server accepts ({size})", "upload_too_large")
