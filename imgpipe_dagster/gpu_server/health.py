"""The ``/health`` contract of a GPU server: one typed document, written by the server and read by
everyone else (launcher, client, throttle, ``imgpipe status``, the gpu_model resource).

``from_json`` tolerates a legacy server's body (only ``workers`` and ``queue_size``) and missing or
mistyped new fields: a probe must describe what it sees, not fail on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class ServerHealth:
    # legacy fields
    workers: int = 0
    queue_size: int = 0
    # loading / ready / draining / failed; None from a legacy server
    status: str | None = None
    error: str | None = None
    model: str | None = None
    model_path: str | None = None
    device: str | None = None
    dtype: str | None = None
    queue_capacity: int = 0
    max_inference_batch_size: int = 0
    max_batch_images: int = 0
    max_request_images: int = 0
    in_flight: int = 0
    batches_in_pipeline: int = 0
    generating: bool = False
    active_requests: int = 0
    processed: int = 0
    failed: int = 0
    rejected_requests: int = 0
    batches: int = 0
    mean_batch_size: float = 0.0
    mean_generation_ms: float = 0.0
    batch_seconds_estimate: float = 0.0
    images_per_second: float = 0.0
    # NVML reading of the server's GPU (gpu_server/nvml.py), None without one
    gpu: dict[str, Any] | None = None
    # the inference engine's memory statistics, None before the model loaded
    memory: dict[str, Any] | None = None
    uptime_s: float = 0.0
    idle_s: float = 0.0
    idle_timeout_s: float = 0.0
    pid: int | None = None
    port: int | None = None
    auth_required: bool = False
    # the ServerSettings the server runs, bearer token left out (ServerSettings.to_dict)
    settings: dict[str, Any] | None = field(default=None, repr=False)
    # gpu_server.settings.settings_hash of those settings
    settings_hash: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, body: Any) -> ServerHealth:
        """The typed document; fields absent or of the wrong type take their defaults."""
        if not isinstance(body, dict):
            raise ValueError(f"/health body is not an object: {type(body).__name__}")
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            if item.name in body:
                value = _coerce(item.type, body[item.name])
                if value is not _INVALID:
                    values[item.name] = value
        return cls(**values)


_INVALID = object()


def _coerce(annotation: str, value: Any) -> Any:
    """``value`` as the field's type (annotations are strings under ``from __future__``)."""
    optional = annotation.endswith("| None")
    if value is None:
        return None if optional else _INVALID
    kind = annotation.removesuffix("| None").strip()
    if kind == "bool":
        return value if isinstance(value, bool) else _INVALID
    if kind == "int":
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _INVALID
    if kind == "float":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _INVALID
    if kind == "str":
        return value if isinstance(value, str) else str(value)
    if kind.startswith("dict"):
        return value if isinstance(value, dict) else _INVALID
    return _INVALID


class HealthUnavailable(Exception):
    """No usable /health answer (refused, timed out, not JSON); the message says which."""


def fetch_health(
    url: str, timeout_s: float, connect_timeout_s: float | None = None, token: str | None = None
) -> ServerHealth:
    """GET ``url``/health. A failed server answers 503 with its document: that is still an answer.
    A server with a token shows the whole document only to a caller that sends it (else the legacy
    fields and the status)."""
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, connect_timeout_s or timeout_s))
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=timeout, headers=headers)
        return ServerHealth.from_json(response.json())
    except (httpx.HTTPError, ValueError) as error:
        raise HealthUnavailable(f"{type(error).__name__}: {error}"[:200]) from None
