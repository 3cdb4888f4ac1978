"""GPU server /health probes for the throttle: all servers at once, each with a short timeout, so a
hung server never holds a tick for longer than ``timeout_s``."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from imgpipe_dagster.throttle.decide import GpuHealth


def probe_one(url: str, timeout_s: float) -> GpuHealth:
    base = url.rstrip("/")
    try:
        response = httpx.get(base + "/health", timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 0.5)))
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return GpuHealth(url=base, reachable=False, error=f"{type(exc).__name__}: {exc}"[:200])
    if not isinstance(body, dict):
        return GpuHealth(
            url=base, reachable=False, error=f"unexpected /health body (HTTP {response.status_code})"
        )
    return health_from_body(base, body)


def health_from_body(url: str, body: dict) -> GpuHealth:
    """A GpuHealth from the JSON of a server's /health (imgpipe_dagster.gpu_server.app.health_snapshot)."""
    return GpuHealth(
        url=url.rstrip("/"),
        reachable=True,
        status=str(body["status"]) if body.get("status") is not None else None,
        queue_size=int(body.get("queue_size") or 0),
        queue_capacity=int(body.get("queue_capacity") or 0),
        memory=body.get("memory") if isinstance(body.get("memory"), dict) else None,
        error=body.get("error") if isinstance(body.get("error"), str) else None,
    )


def probe_all(urls: Sequence[str], timeout_s: float = 1.0) -> tuple[GpuHealth, ...]:
    if not urls:
        return ()
    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        return tuple(pool.map(lambda url: probe_one(url, timeout_s), urls))
