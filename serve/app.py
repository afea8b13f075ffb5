"""The HTTP app: OpenAI chat completions with video, uploads, health, metrics, the page."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loc3r.errors import InputError
from loc3r.fileio import finite_json
from loc3r.runtime.confidence import check_min_confidence
from loc3r.runtime.generate import SamplingConfig
from loc3r.serve.errors import ApiError, install_error_handlers
from loc3r.serve.media import LIVE_PREFIX, MediaResolver
from loc3r.serve.metrics import ServeMetrics
from loc3r.serve.policy import RequestPolicy
from loc3r.models.prompt import check_user_text
from loc3r.serve.openai_api import (
    ChatRequest,
    LocateRequest,
    check_supported,
    chunk,
    completion,
    completion_id,
    finish_reason,
    loc3r_extension,
    question_of,
    usage,
)
from loc3r.serve.settings import ServeSettings
from loc3r.serve.uploads import UploadStore, video_type
from loc3r.serve.worker import ModelWorker, Question, Result

BodyModel = TypeVar("BodyModel", bound=BaseModel)

log = logging.getLogger(__name__)
UPLOAD_PATH = "/v1/videos"  # the one route that takes multipart/form-data
READ = ["GET", "HEAD"]  # every route that is read answers HEAD as GET does (headers, no body)
DEFAULT_MAX_TOKENS = 128
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and headers around the uploaded file
DISCONNECT_POLL_S = 0.2


def create_app(worker: ModelWorker, settings: ServeSettings, uploads: UploadStore) -> FastAPI:
    """The app around a started (or to be started) worker; the caller runs it with uvicorn."""
    app = FastAPI(title="loc3r-serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = worker.metrics
    media = MediaResolver(settings, uploads)
    model_info = worker.pipeline.model_info
    model_names = {model_info.model_id, "loc3r"}
    static = Path(str(resources.files("loc3r.serve").joinpath("static")))
    install_error_handlers(app)
    app.add_middleware(
        RequestPolicy, bound_host=settings.host, allowed_hosts=settings.allowed_hosts, cors_origins=settings.cors_origins,
        api_key=settings.api_key, public_paths={"/health", *page_paths(static)}, upload_paths={UPLOAD_PATH},
    )
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: refusals are counted too
    api = APIRouter()

    @app.api_route("/health", methods=READ)
    async def health() -> JSONResponse:
        """200 while the model thread serves; 503 when it is stuck or dead (so a supervisor restarts the server)."""
        model_thread = worker.health()
        body = {
            "status": model_thread["status"],
            "worker": model_thread,
            "model": model_info.to_dict(),
            "warning": model_info.warning,
            "queue": {"waiting": worker.waiting, "capacity": settings.queue_size},
            "sessions": len(worker.sessions),
            "scenes": worker.scenes(),
            "auth": settings.api_key is not None,
        }
        return JSONResponse(body, status_code=200 if model_thread["status"] == "ok" else 503)

    @api.api_route("/metrics", methods=READ)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.api_route("/v1/models", methods=READ)
    async def models() -> dict[str, Any]:
        entry = {"object": "model", "created": 0, "owned_by": "loc3r", "loc3r": {**model_info.to_dict(), "warning": model_info.warning}}
        return {"object": "list", "data": [{"id": model_info.model_id, **entry}]}

    @api.post(UPLOAD_PATH, status_code=201)
    async def upload(request: Request) -> dict[str, Any]:
        limited = limit_body(request, settings.max_upload_bytes + MULTIPART_OVERHEAD)
        try:
            form = await limited.form(max_files=1, max_fields=4)
        except (MultiPartException, HTTPException) as exc:  # Starlette turns a MultiPartException into a 400 HTTPException
            reason = exc.message if isinstance(exc, MultiPartException) else exc.detail
            raise ApiError(400, f"the upload is not a valid multipart form ({reason}); send one file, in a field named 'file'", "invalid_upload") from None
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise ApiError(400, "send the video as a multipart form field named 'file'", "invalid_upload", "file")
        try:
            info = await run_in_threadpool(uploads.save, file.file, file.filename or "")
        finally:
            await form.close()
        return {**info.to_dict(), "url": info.id}

    @api.api_route("/v1/videos", methods=READ)
    async def list_videos() -> dict[str, Any]:
        data: list[dict[str, Any]] = [{**info.to_dict(), "url": info.id} for info in uploads.list()]
        listing = await run_in_threadpool(media.media_files)
        data += [{"object": "video", "source": "media", "id": path, "url": path} for path in listing]
        data += [{"object": "video", "source": "live", "id": LIVE_PREFIX + name, "url": LIVE_PREFIX + name} for name in settings.live_sources]
        return {"object": "list", "data": data, "media_scan": {"bounded": listing.bounded}}

    @api.api_route("/v1/videos/content", methods=READ)
    async def video_content(url: str) -> FileResponse:
        """The bytes of an uploaded or media-folder video (for the page's player)."""
        ref = await run_in_threadpool(media.content, url)
        # the ETag follows the file's identity: a rewrite that keeps size and mtime is another video
        return FileResponse(ref.path, media_type=video_type(ref.path), headers={"etag": f'"{ref.key[-1].token()}"'})

    @api.api_route("/v1/videos/{video_id}", methods=READ)
    async def video_info(video_id: str) -> dict[str, Any]:
        info = uploads.info(video_id)
        return {**info.to_dict(), "url": info.id}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json_body(request, ChatRequest, settings.max_body_bytes)
        question, max_tokens = await build_question(body)
        worker.submit(question)
        cid, model = completion_id(), model_info.model_id
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(question, cid, model, max_tokens, include_usage)
            return EventSourceResponse(events, sep="\n", ping=15)
        result = await wait_for_result(question, request)
        if result is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        body = finite_json(completion(cid, model, result, max_tokens, question.return_bev))  # a NaN pose is null
        return Response(body, media_type="application/json")

    async def build_question(body: ChatRequest) -> tuple[Question, int]:
        if body.model not in model_names:
            raise ApiError(404, f"model {body.model!r} is not served here; use {model_info.model_id!r}", "model_not_found", "model")
        check_supported(body)
        url, text = question_of(body)
        frames = body.loc3r.frames or min(worker.pipeline.config.num_frames, settings.max_frames)
        if frames > settings.max_frames:
            raise ApiError(400, f"loc3r.frames = {frames} is over this server's limit of {settings.max_frames}", "frames_limit", "loc3r.frames")
        max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, settings.max_new_tokens)
        if max_tokens > settings.max_new_tokens:
            raise ApiError(
                400, f"max_tokens = {max_tokens} is over this server's limit of {settings.max_new_tokens}", "max_tokens_limit", "max_tokens"
            )
        try:
            check_min_confidence(body.loc3r.min_confidence, body.loc3r.confidence_radius, model_info.calibration, "loc3r.min_confidence")
        except InputError as exc:
            raise ApiError(400, str(exc), "no_calibration", "loc3r.min_confidence") from None
        if body.loc3r.scene is not None:
            ref, named_frames = await run_in_threadpool(media.scene, url)
            frames = body.loc3r.frames or named_frames or frames
        else:
            ref = await run_in_threadpool(media.resolve, url)
        sampling = SamplingConfig(
            max_new_tokens=max_tokens,
            temperature=body.temperature or 0.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            seed=body.seed or 0,
        )
        loop = asyncio.get_running_loop()
        question = Question(ref, text, body.loc3r.situation, sampling, frames, body.loc3r.bev, body.stream, loop, asyncio.Queue(),
                            min_confidence=body.loc3r.min_confidence, confidence_radius=body.loc3r.confidence_radius)
        return question, max_tokens

    @api.api_route("/v1/scenes", methods=READ)
    async def list_scenes() -> dict[str, Any]:
        """Scenes named with loc3r-scene add, and which are resident in memory."""
        from loc3r.runtime.scenes import read_scenes

        named = await run_in_threadpool(read_scenes)
        resident = set(worker.scenes()["resident"])
        data = [{"object": "scene", "id": name, "frames": scene.frames, "resident": name in resident} for name, scene in named.items()]
        return {"object": "list", "data": data}

    @api.post("/v1/locate")
    async def locate(request: Request) -> Response:
        """Poses of situations in one scene: each suffix up to <Pos><Ori> over the scene's KV, no answer."""
        body = await read_json_body(request, LocateRequest, settings.max_body_bytes)
        try:
            for situation in body.situations:
                check_user_text(situation, "situation")
            check_min_confidence(body.min_confidence, body.confidence_radius, model_info.calibration, "min_confidence")
        except InputError as exc:
            raise ApiError.from_input(exc) from None
        ref, named_frames = await run_in_threadpool(media.scene, body.scene)
        frames = body.frames or named_frames or min(worker.pipeline.config.num_frames, settings.max_frames)
        if frames > settings.max_frames:
            raise ApiError(400, f"frames = {frames} is over this server's limit of {settings.max_frames}", "frames_limit", "frames")
        if ref.live:
            raise ApiError(400, "a live source is not a scene: locate in a recorded video", "not_a_scene", "scene")
        question = Question(ref, "", "", SamplingConfig(max_new_tokens=1), frames, False, False, asyncio.get_running_loop(), asyncio.Queue(),
                            min_confidence=body.min_confidence, confidence_radius=body.confidence_radius, situations=body.situations)
        worker.submit(question)
        located = await wait_for_result(question, request)
        if located is None:
            return Response(status_code=499)
        out = {"object": "loc3r.locate", "scene": body.scene, "poses": located.poses, "video": located.video,
               "server": located.server, "model": model_info.to_dict(), "warning": model_info.warning}
        return Response(finite_json(out), media_type="application/json")

    app.include_router(api)
    app.mount("/", StaticFiles(directory=static, html=True), name="page")
    return app


def page_paths(static: Path) -> set[str]:
    """The URL paths of the page's own files (public even when an API key is set)."""
    files = {"/" + path.relative_to(static).as_posix() for path in static.rglob("*") if path.is_file()}
    return files | ({"/"} if "/index.html" in files else set())


async def stream_events(question: Question, cid: str, model: str, max_tokens: int, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    """SSE chunks in OpenAI's stream format; a client that goes away cancels the question."""
    try:
        yield data(chunk(cid, model, {"role": "assistant", "content": ""}))
        streamed = 0
        while True:
            kind, payload = await question.events.get()
            if kind == "token":
                streamed += len(payload)
                yield data(chunk(cid, model, {"content": payload}))
            elif kind == "progress":  # the video being encoded: a chunk with no choices, like the usage chunk
                done, total = payload
                yield data({**chunk(cid, model, {}), "choices": [], "loc3r": {"progress": {"stage": "encoding frames", "done": done, "total": total}}})
            elif kind == "error":
                yield data(error_payload(payload))
                return
            else:
                result: Result = payload
                rest = result.answer.text[streamed:]  # text held back for an incomplete UTF-8 sequence
                if rest:
                    yield data(chunk(cid, model, {"content": rest}))
                extension = loc3r_extension(result, question.return_bev)
                yield data(chunk(cid, model, {}, finish_reason(result, max_tokens), loc3r=extension))
                if include_usage:
                    yield data({**chunk(cid, model, {}), "choices": [], "usage": usage(result)})
                yield {"data": "[DONE]"}
                return
    except Exception as exc:  # noqa: BLE001 - a chunk that cannot be made after the 200: the stream ends with the error, not cut off
        log.exception("a streamed answer failed")
        yield data(error_payload(exc))
    finally:
        question.cancelled.set()  # no effect once answered; stops generation if the client left


async def wait_for_result(question: Question, request: Request) -> Result | None:
    """The answer, or None when the client disconnected first (the question is cancelled)."""
    while True:
        try:
            kind, payload = await asyncio.wait_for(question.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                question.cancelled.set()
                return None
            continue
        if kind == "error":
            raise payload
        return payload  # non-streamed questions send no token events


def data(payload: dict[str, Any]) -> dict[str, str]:
    return {"data": finite_json(payload, separators=(",", ":"))}


def error_payload(exc: Exception) -> dict[str, Any]:
    """An error inside a stream (after the 200 was sent): OpenAI's error object as an event."""
    if isinstance(exc, ApiError):
        return exc.body()
    if isinstance(exc, InputError):
        return ApiError.from_input(exc).body()
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return ApiError(500, f"internal error: {type(exc).__name__}: {detail}", "internal_error").body()


def validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


async def read_json_body(request: Request, model: type[BodyModel], limit: int) -> BodyModel:
    """The request's JSON body (at most ``limit`` bytes) as ``model``; a 400 invalid_request
    naming the first field that does not validate."""
    raw = await limit_body(request, limit).body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc), "invalid_request") from None


def limit_body(request: Request, limit: int) -> Request:
    """``request`` whose body is refused with a 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes, over this server's limit of {limit}", "body_too_large")
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes", "body_too_large")
        return message

    return Request(request.scope, receive)


class CountRequests:
    """Counts responses by route and status (pure ASGI: streaming and disconnects untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                name = getattr(route, "path", "static") if route else "unmatched"
                self.metrics.requests.labels(name, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
