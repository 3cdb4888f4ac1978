"""GPU server /health probes for the throttle: all servers at once, each with a short timeout, so a
hung server never holds a tick for longer than ``timeout_s``."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from imgpipe_dagster.gpu_server.health import HealthUnavailable, ServerHealth, fetch_health
from imgpipe_dagster.throttle.decide import GpuHealth


def probe_one(
    url: str, timeout_s: float, token: str | None = None, openai_key: str | None = None, openai: bool = False
) -> GpuHealth:
    """The server's /health (``token``: the servers' bearer token; without it a guarded server shows no
    queue capacity or memory); with ``openai``, a server without one (vLLM, SGLang…) that lists its
    models at ``{base}/models`` counts as ready."""
    base = url.rstrip("/")
    try:
        health = fetch_health(base, timeout_s, connect_timeout_s=0.5, token=token)
    except HealthUnavailable as error:
        if openai and models_listed(base, timeout_s, openai_key):
            return GpuHealth(url=base, reachable=True, status="ready")
        return GpuHealth(url=base, reachable=False, error=str(error))
    return gpu_health_of(base, health)


def models_listed(base_url: str, timeout_s: float, api_key: str | None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url}/models", headers=headers, timeout=httpx.Timeout(timeout_s, connect=0.5))
        return response.status_code == 200 and bool(response.json().get("data"))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def gpu_health_of(url: str, health: ServerHealth) -> GpuHealth:
    """The throttle's view of a server's /health document."""
    return GpuHealth(
        url=url.rstrip("/"),
        reachable=True,
        status=health.status,
        queue_size=health.queue_size,
        queue_capacity=health.queue_capacity,
        memory=health.memory,
        error=health.error,
    )


def probe_all(
    urls: Sequence[str],
    timeout_s: float = 1.0,
    token: str | None = None,
    openai_key: str | None = None,
    openai: bool = False,
) -> tuple[GpuHealth, ...]:
    if not urls:
        return ()
    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        return tuple(pool.map(lambda url: probe_one(url, timeout_s, token, openai_key, openai), urls))
