"""HTTP face of one GPU server (Starlette): /v1/analyze, /v1/settings, /health, /metrics, and the
OpenAI-compatible /v1/chat/completions and /v1/models (openai_api.py).

The app only admits, validates and reports; batching lives in batcher.py and the model in
inference.py. The model loads in a thread after the server starts listening, so /health answers
``"status": "loading"`` at once and ``"ready"`` when requests can be served.

Errors are JSON ``{"error": {"code": ..., "message": ...}}`` with a 4xx/5xx status:
400 malformed body or unknown prompt, 401 missing/wrong bearer token, 413 too many images or bytes,
415 wrong content type, 429 queue full (Retry-After), 503 loading/draining/failed (Retry-After).

``/health`` is the typed document of ``health.py`` (``ServerHealth``), including the settings the
server runs (token left out) and their hash. ``POST /v1/settings`` takes a complete ServerSettings
JSON document and applies it live when only live fields differ (batching, queue sizes,
max_new_tokens: ``settings.LIVE_FIELDS``); other changes answer 409 (the launcher restarts the server).

Authentication: with a bearer token set, /v1/analyze, /v1/settings and /metrics require it. /health
stays open so that supervisors and load balancers can probe without the secret, but without it shows
only the legacy fields and the status (``public_health``); the whole document needs the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imgpipe_dagster.gpu_server import wire
from imgpipe_dagster.gpu_server.batcher import BatcherClosed, DynamicBatcher, QueueFull
from imgpipe_dagster.gpu_server.health import ServerHealth
from imgpipe_dagster.gpu_server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from imgpipe_dagster.gpu_server.metrics import ServerMetrics
from imgpipe_dagster.gpu_server.nvml import GpuMonitor
from imgpipe_dagster.gpu_server.openai_api import openai_routes
from imgpipe_dagster.gpu_server.prompts import UnknownPromptError
from imgpipe_dagster.gpu_server.settings import ServerSettings, SettingsError, apply_live, settings_hash

log = logging.getLogger("imgpipe_dagster.gpu_server")

EngineFactory = Callable[[ServerSettings], Any]


def load_inference_engine(settings: ServerSettings) -> Any:
    """The real engine on the settings' model part."""
    from imgpipe_dagster.gpu_server.inference import InferenceEngine

    return InferenceEngine(settings.model)


class ServerState:
    """Everything the endpoints share; mutated on the event loop only."""

    def __init__(
        self, settings: ServerSettings, engine_factory: EngineFactory, on_exit: Callable[[], None]
    ) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.on_exit = on_exit
        self.engine: Any = None
        self.batcher: DynamicBatcher | None = None
        self.status = "loading"
        self.load_error: str | None = None
        self.started_at = time.monotonic()
        self.ready_at: float | None = None
        self.last_activity = time.monotonic()
        self.active_requests = 0
        self.rejected = 0
        self.metrics = ServerMetrics()
        self.gpu = GpuMonitor(settings.model.device)
        self.tasks: list[asyncio.Task[None]] = []

    def idle_seconds(self) -> float:
        if self.active_requests or (self.batcher and (self.batcher.queued or self.batcher.in_flight)):
            return 0.0
        return time.monotonic() - self.last_activity

    def engine_attr(self, name: str, default: Any = None) -> Any:
        value = getattr(self.engine, name, default) if self.engine is not None else default
        return str(value) if value is not None and not isinstance(value, (int, float, str, bool)) else value

    def gpu_memory_used(self) -> float:
        reading = self.gpu.read()
        if reading:
            return float(reading["memory_used_bytes"])
        stats = self.memory_stats() or {}
        return float(stats.get("allocated_bytes") or stats.get("memory_allocated_bytes") or 0)

    def memory_stats(self) -> dict[str, Any] | None:
        if self.engine is None or not hasattr(self.engine, "memory_stats"):
            return None
        try:
            return self.engine.memory_stats()
        except Exception:
            return None


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _authorised(state: ServerState, request: Request) -> bool:
    token = state.settings.bearer_token
    if not token:
        return True
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(supplied.strip().encode(), token.encode())


async def _read_body_capped(request: Request, cap: int) -> bytes | None:
    """The body, or None when it exceeds ``cap`` bytes (stops reading at the cap)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        return None
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _unavailable(state: ServerState) -> JSONResponse:
    if state.status == "failed":
        return _error(503, "model_failed", f"model failed to load: {state.load_error}")
    return _error(503, state.status, f"server is {state.status}", headers={"Retry-After": "5"})


def _counted(state: ServerState, response: Response) -> Response:
    """Every answer of an analysis endpoint (native or OpenAI) in the request metrics and rejections."""
    state.metrics.requests.labels(status=str(response.status_code)).inc()
    if response.status_code >= 400:
        state.rejected += 1
    return response


async def analyze(request: Request) -> Response:
    state = _state(request)
    return _counted(state, await _analyze(state, request))


async def _analyze(state: ServerState, request: Request) -> Response:
    settings = state.settings
    if not _authorised(state, request):
        return _error(401, "unauthorised", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != wire.CONTENT_TYPE:
        return _error(
            415,
            "unsupported_media_type",
            f"expected Content-Type {wire.CONTENT_TYPE}, got {content_type or 'none'}",
        )
    state.last_activity = time.monotonic()
    state.active_requests += 1
    try:
        body = await _read_body_capped(request, settings.max_request_bytes)
        if body is None:
            return _error(413, "too_large", f"request body exceeds {settings.max_request_bytes} bytes")
        try:
            parsed = wire.decode_request(body)
        except wire.FramingError as error:
            return _error(400, "bad_request", str(error))
        del body
        if not parsed.images:
            return _error(400, "empty", "the request carries no images")
        if len(parsed.images) > settings.request_image_cap:
            return _error(
                413,
                "too_many_images",
                f"{len(parsed.images)} images; at most {settings.request_image_cap} per request",
            )
        if state.status != "ready" or state.batcher is None:
            return _unavailable(state)
        try:
            prompt_version = state.engine.prompt_version(parsed.prompt)
        except UnknownPromptError as error:
            return _error(400, "unknown_prompt", str(error))
        except Exception as error:
            # the cause may name server paths: the log gets it, the client only the prompt's name
            log.warning("prompt %r failed to load: %s: %s", parsed.prompt, type(error).__name__, error)
            return _error(400, "unknown_prompt", f"prompt {parsed.prompt!r} cannot be loaded on this server")
        started = time.monotonic()
        try:
            outcomes = await state.batcher.submit(parsed.images, parsed.prompt)
        except QueueFull as full:
            return _error(429, "queue_full", str(full), {"Retry-After": str(int(full.retry_after_s))})
        except BatcherClosed:
            return _unavailable(state)
        elapsed = time.monotonic() - started
        state.metrics.request_seconds.observe(elapsed)
        results = []
        for index, outcome in enumerate(outcomes):
            result = outcome.result
            entry: dict[str, Any] = {
                "index": index,
                "text": getattr(result, "text", None),
                "analysis": getattr(result, "analysis", None),
                "parse_ok": bool(getattr(result, "parse_ok", False)),
                "prompt_tokens": getattr(result, "prompt_tokens", 0),
                "generated_tokens": getattr(result, "generated_tokens", 0),
                "error": outcome.error or getattr(result, "error", None),
                "batch_size": outcome.batch_size,
                "timings": {
                    "queue_ms": round(outcome.queue_ms, 3),
                    "batch_ms": round(outcome.batch_ms, 3),
                    "prepare_ms": round(outcome.prepare_ms, 3),
                    "inference_ms": round(outcome.inference_ms, 3),
                },
            }
            results.append(entry)
            if entry["error"]:
                state.metrics.images_failed.inc()
            else:
                state.metrics.images_processed.inc()
        return JSONResponse(
            {
                "model": state.engine_attr("model_name"),
                "prompt": parsed.prompt,
                "prompt_version": prompt_version,
                "request_ms": round(elapsed * 1000.0, 3),
                "results": results,
            }
        )
    finally:
        state.active_requests -= 1
        state.last_activity = time.monotonic()


def health_snapshot(state: ServerState) -> ServerHealth:
    settings = state.settings
    batcher = state.batcher
    stats = batcher.stats if batcher else None
    now = time.monotonic()
    return ServerHealth(
        workers=settings.max_concurrent_generations,
        queue_size=batcher.queued if batcher else 0,
        status=state.status,
        error=state.load_error,
        model=state.engine_attr("model_name"),
        model_path=settings.model.model_path,
        device=state.engine_attr("device", settings.model.device),
        dtype=state.engine_attr("dtype"),
        queue_capacity=settings.max_inference_queue_size,
        max_inference_batch_size=settings.max_inference_batch_size,
        max_batch_images=settings.max_batch_images,
        max_request_images=settings.request_image_cap,
        in_flight=batcher.in_flight if batcher else 0,
        batches_in_pipeline=batcher.batches_in_pipeline if batcher else 0,
        generating=bool(batcher and batcher.generating),
        active_requests=state.active_requests,
        processed=stats.processed if stats else 0,
        failed=stats.failed if stats else 0,
        rejected_requests=state.rejected,
        batches=stats.batches if stats else 0,
        mean_batch_size=(stats.batched_images / stats.batches) if stats and stats.batches else 0.0,
        mean_generation_ms=(stats.generation_seconds_total / stats.batches * 1000.0)
        if stats and stats.batches
        else 0.0,
        batch_seconds_estimate=batcher.batch_seconds_estimate if batcher else settings.gen_time_default_est,
        images_per_second=batcher.images_per_second() if batcher else 0.0,
        gpu=state.gpu.read(),
        memory=state.memory_stats(),
        uptime_s=now - state.started_at,
        idle_s=state.idle_seconds(),
        idle_timeout_s=settings.idle_timeout_s,
        pid=os.getpid(),
        port=settings.port,
        auth_required=bool(settings.bearer_token),
        settings=settings.to_dict(include_token=False),
        settings_hash=settings_hash(settings),
    )


async def health(request: Request) -> Response:
    state = _state(request)
    status_code = 503 if state.status == "failed" else 200
    if not _authorised(state, request):
        # Open to probes without the secret, but only liveness: paths, pid, settings and load errors
        # tell an attacker too much.
        return JSONResponse(public_health(state), status_code=status_code)
    return JSONResponse(health_snapshot(state).to_json(), status_code=status_code)


def public_health(state: ServerState) -> dict[str, Any]:
    """What /health shows without the token: the legacy fields, the status and that auth is needed."""
    batcher = state.batcher
    return {
        "workers": state.settings.max_concurrent_generations,
        "queue_size": batcher.queued if batcher else 0,
        "status": state.status,
        "auth_required": True,
    }


async def update_settings(request: Request) -> Response:
    """Apply a complete ServerSettings document live; 409 when a field needs a restart."""
    state = _state(request)
    if not _authorised(state, request):
        return _error(401, "unauthorised", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    try:
        # The token, address and port stay the server's own whatever the document says.
        wanted = ServerSettings.from_json((await request.body()).decode()).replace(
            bearer_token=state.settings.bearer_token, host=state.settings.host, port=state.settings.port,
            insecure_no_token=state.settings.insecure_no_token,
        )
    except (SettingsError, UnicodeDecodeError) as error:
        return _error(400, "bad_settings", str(error))
    try:
        updated = apply_live(state.settings, wanted)
    except SettingsError as error:
        return _error(409, "restart_needed", str(error))
    state.settings = updated
    if state.batcher is not None:
        state.batcher.reconfigure(updated)
    if state.engine is not None and hasattr(state.engine, "take_live_settings"):
        state.engine.take_live_settings(updated.model)
    log.info("settings updated live: hash %s", settings_hash(updated))
    return JSONResponse(health_snapshot(state).to_json())


async def metrics(request: Request) -> Response:
    state = _state(request)
    if not _authorised(state, request):
        return _error(401, "unauthorised", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def _client_disconnected(request: Request, exc: Exception) -> Response:
    # A client gone mid-body is the client's business: one line, no traceback. Nobody reads the answer.
    client = request.client
    log.info("client %s disconnected before its request body to %s was complete",
             f"{client.host}:{client.port}" if client else "?", request.url.path)  # fmt: skip
    return _error(400, "client_disconnected", "the client disconnected before the body was complete")


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, "not_found", f"no route {request.method} {request.url.path}")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return _error(405, "method_not_allowed", f"{request.method} not allowed on {request.url.path}")


async def _load_model(state: ServerState) -> None:
    loop = asyncio.get_running_loop()
    try:
        state.engine = await loop.run_in_executor(None, state.engine_factory, state.settings)
    except Exception as error:
        state.status = "failed"
        state.load_error = f"{type(error).__name__}: {error}"
        log.error("model failed to load:\n%s", traceback.format_exc())
        state.on_exit()
        return
    state.batcher = DynamicBatcher(state.engine, state.settings, on_batch_done=state.metrics.observe_batch)
    state.batcher.start()
    state.status = "ready"
    state.ready_at = state.last_activity = time.monotonic()
    log.info(
        "ready: model=%s device=%s dtype=%s port=%s",
        state.engine_attr("model_name"),
        state.engine_attr("device"),
        state.engine_attr("dtype"),
        state.settings.port,
    )


async def _watch_idle(state: ServerState) -> None:
    timeout = state.settings.idle_timeout_s
    period = min(5.0, max(0.2, timeout / 4))
    while True:
        await asyncio.sleep(period)
        if state.status == "ready" and state.idle_seconds() >= timeout:
            log.info("idle for %.0f s (timeout %.0f s): exiting", state.idle_seconds(), timeout)
            state.status = "draining"
            state.on_exit()
            return


def create_app(
    settings: ServerSettings,
    *,
    engine_factory: EngineFactory = load_inference_engine,
    on_exit: Callable[[], None] | None = None,
) -> Starlette:
    """The ASGI app. ``on_exit`` asks the hosting server to stop (idle timeout, failed model load)."""
    state = ServerState(settings, engine_factory, on_exit or (lambda: None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.metrics.queue_capacity.set(settings.max_inference_queue_size)
        state.metrics.bind_gauges(
            queue_depth=lambda: state.batcher.queued if state.batcher else 0,
            in_flight=lambda: state.batcher.in_flight if state.batcher else 0,
            ready=lambda: 1.0 if state.status == "ready" else 0.0,
            gpu_memory_used=state.gpu_memory_used,
        )
        loop = asyncio.get_running_loop()
        state.tasks.append(loop.create_task(_load_model(state), name="load-model"))
        if settings.idle_timeout_s > 0:
            state.tasks.append(loop.create_task(_watch_idle(state), name="idle-watch"))
        try:
            yield
        finally:
            if state.status != "failed":
                state.status = "draining"
            for task in state.tasks:
                task.cancel()
            if state.batcher is not None:
                await state.batcher.close()
            if state.engine is not None and hasattr(state.engine, "close"):
                state.engine.close()

    app = Starlette(
        routes=[
            Route("/v1/analyze", analyze, methods=["POST"]),
            Route("/v1/settings", update_settings, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            # OpenAI-compatible face over the same batcher (openai_api.py)
            *openai_routes(_authorised, _read_body_capped, _counted),
        ],
        exception_handlers={404: _not_found, 405: _method_not_allowed, ClientDisconnect: _client_disconnected},
        lifespan=lifespan,
    )
    app.state.server = state
    return app
