"""Async client of one GPU server (httpx). Send small batches concurrently; the server batches across them.

Errors map to what a caller does next: :class:`ServerBusy` (429: back off ``retry_after_s``, a loss
signal for the adaptive limiter), :class:`ServerUnavailable` (connection refused, 5xx, loading:
route elsewhere / open the breaker; :class:`ServerTimeout` is its slow-call variant) and
:class:`RequestRejected` (4xx: the request itself is wrong, retrying it is pointless).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from imgpipe_dagster.gpu_server import wire
from imgpipe_dagster.gpu_server.health import ServerHealth


class GpuServerError(Exception):
    """Base of the client's errors."""


class ServerBusy(GpuServerError):
    def __init__(self, retry_after_s: float, message: str = "") -> None:
        super().__init__(message or f"server busy; retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


class ServerUnavailable(GpuServerError):
    def __init__(
        self, message: str, status_code: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class ServerTimeout(ServerUnavailable):
    """No answer within the client's timeout (the server may still be working on it)."""


class RequestRejected(GpuServerError):
    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code


@dataclass(frozen=True)
class ImageAnalysis:
    """The server's answer for one image (``error`` set when only this image failed)."""

    text: str | None
    analysis: dict[str, Any] | None
    parse_ok: bool
    prompt_tokens: int
    generated_tokens: int
    error: str | None
    batch_size: int
    # queue_ms, batch_ms, prepare_ms, inference_ms (see app.py)
    timings: dict[str, float] = field(default_factory=dict)
    prompt_version: str | None = None
    model: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _retry_after(response: httpx.Response, default: float = 1.0) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", default)))
    except ValueError:
        return default


def _error_fields(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json().get("error", {})
        return str(error.get("code", "error")), str(error.get("message", response.text[:200]))
    except (ValueError, AttributeError):
        return "error", response.text[:200]


class GpuClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 120.0,
        *,
        connect_timeout_s: float = 5.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def __aenter__(self) -> GpuClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def analyze(self, images: Sequence[bytes], prompt: str = "analysis_v1") -> list[ImageAnalysis]:
        """One result per image, in order. Raises ServerBusy, ServerUnavailable or RequestRejected."""
        body = wire.encode_request(images, prompt)
        response = await self._send(
            "POST", "/v1/analyze", content=body, headers={"Content-Type": wire.CONTENT_TYPE}
        )
        payload = response.json()
        prompt_version = payload.get("prompt_version")
        model = payload.get("model")
        return [
            ImageAnalysis(
                text=item.get("text"),
                analysis=item.get("analysis"),
                parse_ok=bool(item.get("parse_ok")),
                prompt_tokens=int(item.get("prompt_tokens") or 0),
                generated_tokens=int(item.get("generated_tokens") or 0),
                error=item.get("error"),
                batch_size=int(item.get("batch_size") or 0),
                timings=dict(item.get("timings") or {}),
                prompt_version=prompt_version,
                model=model,
            )
            for item in payload["results"]
        ]

    async def health(self) -> ServerHealth:
        """The server's /health document (also while loading; a failed server raises ServerUnavailable)."""
        response = await self._send("GET", "/health")
        try:
            return ServerHealth.from_json(response.json())
        except ValueError as error:
            raise ServerUnavailable(f"{self.base_url}/health: unusable body: {error}") from error

    async def metrics(self) -> str:
        response = await self._send("GET", "/metrics")
        return response.text

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as error:
            raise ServerTimeout(f"{self.base_url}{path}: timed out ({type(error).__name__})") from error
        except httpx.TransportError as error:
            raise ServerUnavailable(f"{self.base_url}{path}: {type(error).__name__}: {error}") from error
        if response.status_code == 429:
            raise ServerBusy(_retry_after(response), _error_fields(response)[1])
        if response.status_code >= 500:
            code, message = _error_fields(response)
            retry_after = _retry_after(response) if "retry-after" in response.headers else None
            raise ServerUnavailable(
                f"{response.status_code} {code}: {message}", response.status_code, retry_after
            )
        if response.status_code >= 400:
            raise RequestRejected(response.status_code, *_error_fields(response))
        return response
