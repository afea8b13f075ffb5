"""The OpenAI chat-completions format, as far as a video question needs it.

A request is one user message with one ``video_url`` part and text; Loc3R options ride in
the extension field ``loc3r`` (``situation``, ``frames``, ``bev``, ``min_confidence``,
``confidence_radius``). Every response (the
completion, or the last chunk of a stream) carries the extension field ``loc3r``: the pose,
the runtime's timings as it reports them, the video, the model, the server's own timings,
and, when asked for, the layout map's points.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from loc3r.models.prompt import check_user_text
from loc3r.serve.errors import ApiError
from loc3r.serve.worker import Result

MAX_MAP_POINTS = 2000
UNSUPPORTED = {  # parameters whose meaning this server cannot honour: refused, never ignored
    "tools": "tool calls", "functions": "function calls", "tool_choice": "tool calls", "function_call": "function calls",
    "response_format": "structured output", "stop": "stop sequences", "logprobs": "log probabilities",
    "top_logprobs": "log probabilities", "audio": "audio output", "prediction": "predicted outputs",
}


class VideoURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    video_url: VideoURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Loc3rOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    situation: str = ""
    scene: str | None = None  # a scene named with loc3r-scene add, or a video URL: instead of a video part
    frames: int | None = Field(default=None, ge=1)
    bev: bool = False  # return the layout map's points (for drawing)
    # a pose whose P(error <= confidence_radius) is below this is answered "not localized"
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    confidence_radius: Literal[0.5, 1.0] = 1.0


class LocateRequest(BaseModel):
    """``POST /v1/locate``: the poses of situations in one scene, no answer."""

    model_config = ConfigDict(extra="forbid")
    scene: str = Field(min_length=1)  # a scene named with loc3r-scene add, or a video URL
    situations: list[str] = Field(min_length=1, max_length=256)
    frames: int | None = Field(default=None, ge=1)
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    confidence_radius: Literal[0.5, 1.0] = 1.0


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)
    loc3r: Loc3rOptions = Field(default_factory=Loc3rOptions)


def check_supported(request: ChatRequest) -> None:
    """Refuse what would silently change the answer's meaning if ignored."""
    extra = request.model_extra or {}
    for name, what in UNSUPPORTED.items():
        if extra.get(name) not in (None, False, [], {}):
            raise ApiError(400, f"{name}: {what} are not supported by this server", "unsupported_parameter", name)
    if (request.n or 1) > 1:
        raise ApiError(400, "n: one answer per request is supported; send n = 1", "unsupported_parameter", "n")


def question_of(request: ChatRequest) -> tuple[str, str]:
    """(video URL, question text) of the request's one user message."""
    for message in request.messages:
        if message.role in ("system", "developer"):
            raise ApiError(400, f"{message.role} messages are not supported: the model's system prompt is fixed", "unsupported_message", "messages")
        if message.role != "user":
            raise ApiError(
                400, f"{message.role} messages are not supported: each request is one question about one video; "
                "send only the user message (earlier answers are not part of the prompt)", "unsupported_message", "messages",
            )
    if len(request.messages) != 1:
        raise ApiError(400, "send one user message (a video part and the question)", "unsupported_message", "messages")
    content = request.messages[0].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else content or []
    videos = [part.video_url.url for part in parts if part.type == "video_url" and part.video_url]
    others = sorted({part.type for part in parts} - {"text", "video_url"})
    if others:
        message = f"content parts of type {', '.join(others)} are not supported: send a video_url part and text"
        raise ApiError(400, message, "unsupported_content", "messages")
    if request.loc3r.scene is not None and not videos:
        videos = [request.loc3r.scene]
    elif request.loc3r.scene is not None:
        raise ApiError(400, "the message has a video part and loc3r.scene names one too; send one of them", "video_required", "loc3r.scene")
    if len(videos) != 1:
        message = f"the message has {len(videos)} video parts; send exactly one {{\"type\": \"video_url\", ...}} or loc3r.scene"
        raise ApiError(400, message, "video_required", "messages")
    text = "\n".join(part.text for part in parts if part.type == "text" and part.text)
    check_user_text(text, "question", allow_empty=False)
    check_user_text(request.loc3r.situation, "situation")
    return videos[0], text


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def loc3r_extension(result: Result, return_bev: bool) -> dict[str, Any]:
    """The ``loc3r`` field: the runtime's answer record (pose, timings, video, model) without
    the text the message already carries, plus the server's own figures."""
    record = result.answer.to_dict()
    for text_field in ("question", "answer", "answer_token_ids"):
        record.pop(text_field, None)
    record["video"] = {**record["video"], "source": result.video_url}  # as the client named it, not the server's path
    record["server"] = result.server
    if return_bev and result.answer.bev_points is not None:
        points = result.answer.bev_points.reshape(-1, 2)
        step = max(1, -(-len(points) // MAX_MAP_POINTS))
        record["bev_points"] = np.round(points[::step], 3).tolist()
    return record


def usage(result: Result) -> dict[str, int]:
    completion = len(result.answer.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion, "total_tokens": result.prompt_tokens + completion}


def finish_reason(result: Result, max_tokens: int) -> str:
    return "length" if len(result.answer.token_ids) >= max_tokens else "stop"


def completion(cid: str, model: str, result: Result, max_tokens: int, return_bev: bool) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.answer.text},
            "finish_reason": finish_reason(result, max_tokens),
        }],
        "usage": usage(result),
        "loc3r": loc3r_extension(result, return_bev),
    }


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
