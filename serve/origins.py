"""Names a server answers to, and web origins: parsed the way browsers send them."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class HostRule:
    """The names a server answers to (the ``Host`` header, port ignored)."""

    def __init__(self, bound: str, allowed: Iterable[str]) -> None:
        self.bound = bound.strip("[]").lower()
        names = {allowed_name(name) or name for name in allowed}  # settings.check refused what is no name
        self.any_name = "*" in names
        self.suffixes = tuple(name for name in names if name.startswith("."))
        self.names = {name.strip("[]") for name in names if name != "*" and not name.startswith(".")}

    def allows(self, host: str) -> bool:
        name = host_name(host)
        if name is None:
            return False
        if self.any_name or name in LOOPBACK_NAMES or name == self.bound or name in self.names:
            return True
        if self.suffixes and name.endswith(self.suffixes):
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False  # a DNS name nobody vouched for: a rebinding page's own name
        return address.is_loopback or self.bound in WILDCARD_BINDS or str(address) in self.names


def allowed_name(name: str) -> str | None:
    """An ``--allowed-host`` value as the rule compares it (lower case, no port, no trailing
    dot, an IP address in its short form; ``.suffix`` and ``*`` kept); None if it names no host."""
    name = name.strip().lower()
    if name == "*":
        return name
    dot, core = (".", name[1:]) if name.startswith(".") else ("", name)
    try:
        return dot + str(ipaddress.ip_address(core.strip("[]")))
    except ValueError:
        pass
    host = host_name(core)
    if host is None or not all(char.isascii() and (char.isalnum() or char in "-_.") for char in host) or not host.strip("."):
        return None
    return dot + host


def host_name(host: str) -> str | None:
    """The lower-case name of a ``Host`` header (``[::1]:8000`` -> ``::1``); None if malformed."""
    try:
        parts = urlsplit(f"//{host}")
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname.rstrip(".")


DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_parts(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an ``Origin`` (default port filled in); None if malformed."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.username is not None:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port or DEFAULT_PORTS[parts.scheme]


def origin_key(origin: str) -> str | None:
    """``scheme://host[:port]`` lower-cased, the scheme's default port dropped; None if malformed."""
    parts = origin_parts(origin)
    if parts is None:
        return None
    scheme, host, port = parts
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port != DEFAULT_PORTS[scheme] else "")


def same_origin(origin: str, host: str) -> bool:
    """True when ``origin`` names the server as the request reached it: same host and port (a
    ``Host`` without a port was reached on the origin's default port)."""
    parts, name = origin_parts(origin), host_name(host)
    if parts is None or name is None:
        return False
    scheme, origin_host, origin_port = parts
    port = urlsplit(f"//{host}").port or DEFAULT_PORTS[scheme]
    return origin_host == name and origin_port == port


