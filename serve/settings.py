"""What one server allows: its address, key, media folder, limits and live sources."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from loc3r.errors import InputError
from loc3r.serve.origins import allowed_name, origin_key

MIB = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """Limits and policies of one server (every default is the safe one)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    media_dir: Path | None = None  # videos a client may name by relative path; None: uploads only
    upload_dir: Path | None = None  # None: $LOC3R_HOME/serve/uploads
    allow_remote_urls: bool = False  # http(s) video URLs are fetched only when enabled
    allow_private_urls: tuple[str, ...] = ()  # networks downloads may reach beyond the public internet ("*": any)
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides the bound address and loopback
    cors_origins: tuple[str, ...] = ()  # web pages of other origins that may use the API
    max_upload_bytes: int = 512 * MIB
    upload_store_bytes: int = 4096 * MIB  # oldest uploads are deleted beyond this
    max_frames: int | None = None  # None: the model's frame count
    max_new_tokens: int = 512
    max_body_bytes: int = 1 * MIB  # JSON requests
    queue_size: int = 16
    max_passes: int = 4  # a question may be passed over this often for ones on the cached video (0: first come, first served)
    session_memory_bytes: int = 2048 * MIB
    scene_memory_bytes: int = 1024 * MIB  # scenes' KV kept resident in host memory (LRU, spilled to the scene store)
    live_sources: dict[str, str] = field(default_factory=dict)  # name -> camera:N / rtsp://...
    live_stride: int = 15
    remote_timeout_s: float = 30.0
    stuck_after_s: float = 600.0  # /health says "stuck" when a question has not moved (no token) for this long

    def check(self) -> None:
        """Refuse an unsafe or impossible configuration, with the fix."""
        if not is_loopback(self.host) and not self.api_key:
            raise InputError(
                f"--host {self.host} would expose the server beyond this machine without a key",
                "pass --api-key KEY (clients then send 'Authorization: Bearer KEY'), or bind 127.0.0.1",
            )
        if self.api_key and (self.api_key != self.api_key.strip() or not self.api_key.isprintable()):
            raise InputError(
                "--api-key has spaces at its ends or control characters, which an Authorization header cannot carry",
                "use a key of printable characters without leading or trailing spaces",
            )
        for name in self.allowed_hosts:
            if allowed_name(name) is None:
                raise InputError(
                    f"--allowed-host {name!r} is not a host name",
                    "give a name or address as clients reach the server, e.g. --allowed-host gpu-box.lan (.example.org: its subdomains)",
                )
        for origin in self.cors_origins:
            if origin != "*" and origin_key(origin) is None:
                raise InputError(f"--cors-origin {origin!r} is not an origin", "give scheme://host[:port], e.g. --cors-origin http://localhost:5173")
        for network in self.allow_private_urls:
            if network != "*":
                try:
                    ipaddress.ip_network(network, strict=False)
                except ValueError:
                    raise InputError(f"--allow-private-urls {network!r} is not a network", "give addresses or CIDR ranges, e.g. 192.168.1.0/24") from None
        if self.media_dir is not None and not self.media_dir.is_dir():
            raise InputError(f"--media-dir {self.media_dir} is not a folder", "pass an existing folder of videos")
        for name in self.live_sources:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise InputError(f"live source name {name!r} is not a simple name", "use letters, digits, - and _ (e.g. --live front=camera:0)")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
