"""The whole pipeline's state in one object (the legacy redis-cli / psql / curl checks in one).

Backlog (URLs and shards pending, done, failed), URLs per minute over the last 10 minutes, the ETA,
each GPU server's /health (queue, batch size, images/s, memory) with the circuit breaker the runs
see for it, the profile in force and the throttle's last decision with its reason. `imgpipe status`
(imgpipe_dagster.cli.status) draws it on one screen or prints it as JSON.

The breaker lives inside each run's router, so runs publish it (imgpipe_dagster.router_snapshots)
and ``collect`` reads the fresh snapshots back.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from imgpipe_dagster.gpu_server.health import HealthUnavailable, fetch_health
from imgpipe_dagster.router_snapshots import read_breakers
from imgpipe_dagster.store.stats import Progress, progress

HEALTH_TIMEOUT_S = 2.0
DEFAULT_PROFILE = "medium"


@dataclass
class GpuServerStatus:
    url: str
    reachable: bool
    status: str | None = None  # loading / ready / draining / failed, from /health
    device: str | None = None
    queue_size: int = 0
    queue_capacity: int = 0
    max_batch_size: int = 0
    mean_batch_size: float = 0.0
    images_per_s: float = 0.0
    processed: int = 0
    failed: int = 0
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_kind: str | None = None  # "gpu" (NVML / torch.cuda) or "rss" (CPU server process)
    breaker: str | None = None  # closed / open / half-open as the runs' routers see it; None: no run
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)  # a dead managed server: the end of its log


@dataclass
class Status:
    generated_at: str
    urls: dict[str, int]  # pending / leased / failed_retryable / failed_permanent / done / total / unfinished
    shards: dict[str, int]  # total / unfinished / done
    per_minute: list[dict[str, Any]]  # the last 10 minutes, oldest first: minute (HH:MM UTC), ok, failed
    urls_per_min_10m: float
    urls_per_min_1h: float
    eta_s: float | None
    profile: str
    profile_source: str  # "throttle" when a decision set it, else "default"
    paused: bool
    last_decision: dict[str, Any] | None  # decision_id, decided_at, action, profile, reason, submitted
    gpu_servers: list[GpuServerStatus] = field(default_factory=list)
    top_errors_24h: list[tuple[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------- collecting


def known_gpu_servers(extra: list[str] | None = None, registry_url: str | None = None) -> list[str]:
    """Servers the launcher recorded under $IMGPIPE_HOME/gpu-servers, the live servers of the registry in
    ``registry_url``, then $IMGPIPE_GPU_ENDPOINTS and ``extra``."""
    from imgpipe_dagster.environment import read_environment
    from imgpipe_dagster.gpu_server.discovery import discover_endpoints

    return discover_endpoints([*read_environment().gpu_endpoints, *(extra or [])], registry_url=registry_url)


DEAD_LOG_LINES = 5


def dead_managed_servers(records_dir: Path | None = None) -> list[GpuServerStatus]:
    """Servers the launcher recorded whose process is gone (killed, crashed, or left after its idle
    timeout): listed as dead with the end of their log, not hidden. A run restarts its own."""
    from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher, tail_of_log

    dead = []
    for record in GpuServerLauncher(records_dir).status():
        if record["alive"] or not record.get("port"):
            continue
        tail = tail_of_log(record.get("log", ""), DEAD_LOG_LINES).splitlines()
        dead.append(GpuServerStatus(
            url=record["url"].rstrip("/"), reachable=False, status="dead", device=record.get("device"),
            error=f"process {record.get('pid')} is gone (managed server, {record.get('device')})", log_tail=tail,
        ))  # fmt: skip
    return dead


def probe_gpu_server(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> GpuServerStatus:
    from imgpipe_dagster.environment import read_environment

    try:
        health = fetch_health(url, timeout_s, token=read_environment().gpu_token)
    except HealthUnavailable as exc:
        return GpuServerStatus(url=url, reachable=False, error=str(exc)[:120])
    server = GpuServerStatus(
        url=url, reachable=True, status=health.status, device=health.device,
        queue_size=health.queue_size, queue_capacity=health.queue_capacity,
        max_batch_size=health.max_inference_batch_size, mean_batch_size=health.mean_batch_size,
        images_per_s=health.images_per_second, processed=health.processed, failed=health.failed,
        error=health.error,
    )  # fmt: skip
    gpu, memory = health.gpu or {}, health.memory or {}
    if gpu.get("memory_total_bytes"):
        server.memory_kind = "gpu"
        server.memory_used_bytes, server.memory_total_bytes = gpu["memory_used_bytes"], gpu["memory_total_bytes"]
    elif memory.get("total_bytes"):
        server.memory_kind = "gpu"
        server.memory_used_bytes = memory["total_bytes"] - memory.get("free_bytes", 0)
        server.memory_total_bytes = memory["total_bytes"]
    elif health.pid and _is_loopback(url):
        server.memory_kind = "rss"  # a CPU server here: its process memory is what grows
        server.memory_used_bytes = _rss(health.pid)
    return server


def _is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("127.0.0.1", "localhost", "::1")


def _rss(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def last_decision(conn: psycopg.Connection) -> dict[str, Any] | None:
    """The throttle's latest decision, or None when there is none (or its table is not migrated yet)."""
    try:
        row = conn.execute(
            "SELECT decision_id, decided_at, source, action, profile, paused, reason, submitted"
            " FROM throttle_decisions ORDER BY decision_id DESC LIMIT 1"
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        return None
    if row is None:
        return None
    keys = ("decision_id", "decided_at", "source", "action", "profile", "paused", "reason", "submitted")
    decision = dict(zip(keys, row, strict=True))
    decision["decided_at"] = decision["decided_at"].astimezone(UTC).isoformat(timespec="seconds")
    decision["submitted"] = list(decision["submitted"] or [])
    return decision


def _last_ten_minutes(p: Progress, now: datetime) -> list[dict[str, Any]]:
    """One entry per minute, zeros where nothing finished (the view only has minutes with results)."""
    seen = {minute: (ok, failed) for minute, ok, failed in p.per_minute}
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=9)
    minutes = [(start + timedelta(minutes=i)).strftime("%H:%M") for i in range(10)]
    return [{"minute": m, "ok": seen.get(m, (0, 0))[0], "failed": seen.get(m, (0, 0))[1]} for m in minutes]


def collect(
    conn: psycopg.Connection,
    gpu_urls: list[str] | None = None,
    include_dead: bool = False,
    registry_url: str | None = None,
) -> Status:
    """Everything the screen shows; ``gpu_urls`` None means the servers ``known_gpu_servers`` finds (with
    the registry of ``registry_url``, the project database) and the dead managed ones (``include_dead``
    adds those to a given list too)."""
    conn.execute("SET TIME ZONE 'UTC'")  # the per-minute view's labels match the minutes built here
    p = progress(conn)
    now = conn.execute("SELECT now()").fetchone()[0].astimezone(UTC)
    decision = last_decision(conn)
    urls = dict(p.urls_by_state) | {"total": p.urls_total, "unfinished": p.urls_unfinished}
    urls_servers = known_gpu_servers(registry_url=registry_url) if gpu_urls is None else [u.rstrip("/") for u in gpu_urls]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(urls_servers)))) as pool:
        servers = list(pool.map(probe_gpu_server, urls_servers))
    if gpu_urls is None or include_dead:
        servers += [dead for dead in dead_managed_servers() if dead.url not in urls_servers]
    breakers = read_breakers()
    for server in servers:
        server.breaker = breakers.get(server.url)
    return Status(
        generated_at=now.isoformat(timespec="seconds"),
        urls=urls,
        shards={"total": p.shards_total, "unfinished": p.shards_unfinished,
                "done": p.shards_total - p.shards_unfinished},  # fmt: skip
        per_minute=_last_ten_minutes(p, now),
        urls_per_min_10m=round(p.rate_10m_per_s * 60, 1),
        urls_per_min_1h=round(p.rate_1h_per_s * 60, 1),
        eta_s=p.eta_s,
        profile=decision["profile"] if decision else DEFAULT_PROFILE,
        profile_source="throttle" if decision else "default",
        paused=bool(decision and decision["paused"]),
        last_decision=decision,
        gpu_servers=servers,
        top_errors_24h=[(str(c), int(n)) for c, n in p.top_errors_24h[:5]],
    )


def format_eta(seconds: float | None) -> str:
    """An ETA for people: ``2d 3h 05m``; None (no recent rate) says why there is none."""
    if seconds is None:
        return "unknown (nothing finished in the last hour)"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return (f"{days}d " if days else "") + f"{hours}h {rest // 60:02d}m"
