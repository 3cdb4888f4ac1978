"""The GPU server's OpenAI-compatible face: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Other tools (and this project's own ``api: openai`` tier) can use the server like a vLLM one. A chat
request carries exactly one image as a base64 ``data:`` URI in an ``image_url`` part and, as text, the
wording of one of the server's prompt files (resources/prompts): the engine runs named, versioned
prompts only, so a text that matches none is refused (400) rather than answered with another prompt.
The image goes into the same admission queue and dynamic batcher as ``/v1/analyze``, so requests from
many clients share batches. Decoding is greedy whatever ``temperature`` says, and the answer is at
most the server's ``max_new_tokens`` long (``max_tokens`` may only lower what ``usage`` reports as
the limit; the server's setting is what generation uses). Remote images (http URLs) are refused: the
server never downloads.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "code", "param"}}``: 400 malformed request,
401 wrong key (the bearer token, when the server has one), 404 unknown model, 413 too large, 429 queue
full with Retry-After, 503 loading or draining with Retry-After.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imgpipe_dagster.gpu_server.batcher import BatcherClosed, QueueFull
from imgpipe_dagster.gpu_server.prompts import UnknownPromptError, available_prompts, load_prompt

Authorised = Callable[[Any, Request], bool]
ReadBody = Callable[[Request, int], Awaitable[bytes | None]]
Counted = Callable[[Any, Response], Response]


class ChatRequestError(ValueError):
    """The chat request cannot be served; ``status`` and ``code`` say how to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def openai_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": code, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def served_model_name(state: Any) -> str:
    name = state.engine_attr("model_name")
    return str(name) if name else Path(state.settings.model.model_path.rstrip("/")).name


def prompt_by_text(text: str) -> str:
    """The name of the prompt file whose wording is ``text`` (whitespace at the ends ignored)."""
    wanted = text.strip()
    for name in available_prompts():
        try:
            if load_prompt(name).text == wanted:
                return name
        except UnknownPromptError:
            continue
    raise ChatRequestError(
        "the text part must be the wording of one of this server's prompts "
        f"({', '.join(available_prompts())}, under resources/prompts)", code="unknown_prompt"
    )


def parse_chat_request(body: bytes) -> tuple[bytes, str, str | None]:
    """(image bytes, prompt name, requested model) of one chat-completions body."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ChatRequestError(f"body is not JSON: {error}") from None
    except RecursionError:  # a body of many '[' must be a 400, like the native API's header (wire.py)
        raise ChatRequestError("body is JSON nested too deep") from None
    if not isinstance(document, dict) or not isinstance(document.get("messages"), list):
        raise ChatRequestError("body must be an object with a 'messages' list")
    if document.get("stream"):
        raise ChatRequestError("streaming is not supported: send 'stream': false")
    if document.get("n", 1) != 1:
        raise ChatRequestError("only n = 1 is supported")
    images: list[str] = []
    texts: list[str] = []
    for message in document["messages"]:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue  # system and assistant turns do not change the prompt file's wording
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ChatRequestError("a user message's content must be a string or a list of parts")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise ChatRequestError("an image_url part needs image_url.url")
                images.append(url)
            else:
                raise ChatRequestError(f"unsupported content part {kind!r} (text and image_url only)")
    if len(images) != 1:
        raise ChatRequestError(f"a request must carry exactly one image, got {len(images)}")
    model = document.get("model")
    return decode_data_uri(images[0]), prompt_by_text("\n".join(texts)), model if isinstance(model, str) else None


def decode_data_uri(url: str) -> bytes:
    if not url.startswith("data:"):
        raise ChatRequestError("images must be base64 data: URIs (this server does not download URLs)")
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise ChatRequestError("the image data URI must be base64 (data:image/...;base64,...)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ChatRequestError("the image data URI is not valid base64") from None


def completion(state: Any, outcome: Any, model: str) -> dict[str, Any]:
    result = outcome.result
    generated = int(getattr(result, "generated_tokens", 0) or 0)
    prompt_tokens = int(getattr(result, "prompt_tokens", 0) or 0)
    limit = state.settings.model.max_new_tokens
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": getattr(result, "text", "") or ""},
            "finish_reason": "length" if generated >= limit else "stop",
        }],  # fmt: skip
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                  "total_tokens": prompt_tokens + generated},  # fmt: skip
    }


def openai_routes(authorised: Authorised, read_body: ReadBody, counted: Counted) -> list[Route]:
    """The routes, given the app's bearer check, capped body reader and request accounting (app.py
    owns all three)."""

    def unauthorised() -> JSONResponse:
        return openai_error(401, "invalid_api_key", "missing or wrong API key (bearer token)",
                            {"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def models(request: Request) -> Response:
        state = request.app.state.server
        if not authorised(state, request):
            return unauthorised()
        entry = {"id": served_model_name(state), "object": "model", "created": int(time.time()),
                 "owned_by": "imgpipe"}  # fmt: skip
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_completions(request: Request) -> Response:
        state = request.app.state.server
        return counted(state, await _chat(state, request))

    async def _chat(state: Any, request: Request) -> Response:
        if not authorised(state, request):
            return unauthorised()
        state.last_activity = time.monotonic()
        state.active_requests += 1
        try:
            body = await read_body(request, state.settings.max_request_bytes)
            if body is None:
                return openai_error(413, "too_large", f"request body exceeds {state.settings.max_request_bytes} bytes")
            try:
                image, prompt_name, model = parse_chat_request(body)
            except ChatRequestError as error:
                return openai_error(error.status, error.code, str(error))
            served = served_model_name(state)
            if model and model != served:
                return openai_error(404, "model_not_found", f"model {model!r} is not served here; this server serves {served!r}")
            if state.status != "ready" or state.batcher is None:
                if state.status == "failed":
                    return openai_error(503, "model_failed", f"model failed to load: {state.load_error}")
                return openai_error(503, state.status, f"server is {state.status}", {"Retry-After": "5"})
            started = time.monotonic()
            try:
                (outcome,) = await state.batcher.submit([image], prompt_name)
            except QueueFull as full:
                return openai_error(429, "queue_full", str(full), {"Retry-After": str(int(full.retry_after_s))})
            except BatcherClosed:
                return openai_error(503, "draining", "server is shutting down", {"Retry-After": "5"})
            state.metrics.request_seconds.observe(time.monotonic() - started)
            error = outcome.error or getattr(outcome.result, "error", None)
            if error:
                state.metrics.images_failed.inc()
                return openai_error(400, "image_failed", f"the image could not be analysed: {error}")
            state.metrics.images_processed.inc()
            return JSONResponse(completion(state, outcome, served))
        finally:
            state.active_requests -= 1
            state.last_activity = time.monotonic()

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
