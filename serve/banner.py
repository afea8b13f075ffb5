"""What ``loc3r-serve`` says when it starts: the model, the address, the media folder and
the request policy, so that whoever started it knows what they are exposing."""

from __future__ import annotations

from loc3r.runtime.result import ModelInfo
from loc3r.serve.media import MediaListing
from loc3r.serve.settings import ServeSettings, is_loopback


def url_of(settings: ServeSettings) -> str:
    """The page's URL (an IPv6 address in brackets; 0.0.0.0 / :: shown as given)."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}/"


def banner(model: ModelInfo, settings: ServeSettings, media: MediaListing | None) -> list[str]:
    """The lines of the start-up banner (without the program's name)."""
    lines = [f"model     {model.model_id} ({model.backend}, {model.dtype} on {model.device}, 3D encoder {model.encoder_3d})"]
    if model.warning:
        lines.append(f"          {'RANDOM WEIGHTS' if model.random_weights else 'UNTRAINED HEADS'}: {model.warning}")
    url = url_of(settings)
    lines.append(f"page      {url}   (OpenAI-compatible API: {url}v1/chat/completions)")
    if media is None:
        lines.append("media     none: clients upload videos (POST /v1/videos)")
    else:
        listed = f"{len(media.paths)} video(s) listed" + (f"; {media.bounded}" if media.bounded else "")
        lines.append(f"media     {settings.media_dir.resolve() if settings.media_dir else '-'} ({listed})")
    reach = "this machine only (loopback)" if is_loopback(settings.host) else f"the network ({settings.host})"
    key = "required (Authorization: Bearer KEY)" if settings.api_key else "none"
    lines.append(f"access    {reach}; API key: {key}")
    hosts = ", ".join(settings.allowed_hosts) or "the bound address and loopback names"
    origins = ", ".join(settings.cors_origins) or "same origin only"
    lines.append(f"policy    Host header: {hosts}; browser origins: {origins}")
    remote = "off" if not settings.allow_remote_urls else (
        "on, public addresses only" if not settings.allow_private_urls else f"on, also {', '.join(settings.allow_private_urls)}"
    )
    lines.append(f"limits    queue {settings.queue_size}, {settings.max_new_tokens} new tokens, {settings.max_frames} frames, "
                 f"uploads up to {settings.max_upload_bytes >> 20} MiB; remote video URLs: {remote}")
    if settings.live_sources:
        lines.append(f"live      {', '.join(f'live:{name}' for name in settings.live_sources)}")
    lines.append("stop      Ctrl-C (a question being answered is cancelled)")
    return lines
