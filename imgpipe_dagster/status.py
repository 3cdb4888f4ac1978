"""`imgpipe status`: the whole pipeline on one screen (the legacy redis-cli / psql / curl checks in one).

Backlog (URLs and shards pending, done, failed), URLs per minute over the last 10 minutes, the ETA,
each GPU server's /health (queue, batch size, images/s, memory) with the circuit breaker the runs
see for it, the profile in force and the throttle's last decision with its reason. ``--json`` prints
the same data as one JSON object; ``--watch`` redraws it every few seconds. Every line fits 100 columns.

The breaker lives inside each run's router, so runs publish it with ``write_router_snapshot`` and
this command reads the fresh snapshots back (older than ``ROUTER_SNAPSHOT_MAX_AGE_S``: no run uses it).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from imgpipe_dagster.environment import GPU_ENDPOINTS_ENV
from imgpipe_dagster.gpu_server.health import HealthUnavailable, fetch_health
from imgpipe_dagster.paths import imgpipe_home
from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.stats import Progress, progress

SCREEN_WIDTH = 100
# A run rewrites its snapshot every progress interval; older ones belong to runs that ended.
ROUTER_SNAPSHOT_MAX_AGE_S = 120.0
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


def router_snapshot_dir() -> Path:
    return imgpipe_home() / "router"


def write_router_snapshot(run_id: str, snapshot: dict | None) -> None:
    """Publish a run's router snapshot (``ShardRunner`` progress summaries carry it as "router")."""
    if not snapshot:
        return
    folder = router_snapshot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{run_id}.json"
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps({"written_at": time.time(), "router": snapshot}, default=str))
    temporary.replace(target)  # readers never see half a file


def read_breakers(max_age_s: float = ROUTER_SNAPSHOT_MAX_AGE_S) -> dict[str, str]:
    """Endpoint URL -> worst breaker state over the runs that published a fresh snapshot."""
    rank = {"closed": 0, "half-open": 1, "open": 2}
    found: dict[str, str] = {}
    folder = router_snapshot_dir()
    if not folder.is_dir():
        return found
    now = time.time()
    for path in folder.glob("*.json"):
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if now - float(body.get("written_at", 0)) > max_age_s:
            continue
        for endpoint in body.get("router", {}).get("endpoints", []):
            url = str(endpoint.get("url", "")).rstrip("/")
            state = str(endpoint.get("breaker", {}).get("state", ""))
            if url and state in rank and rank[state] >= rank.get(found.get(url, "closed"), 0):
                found[url] = state
    return found


def known_gpu_servers(extra: list[str] | None = None) -> list[str]:
    """Servers the launcher recorded under $IMGPIPE_HOME/gpu-servers, then $IMGPIPE_GPU_ENDPOINTS and ``extra``."""
    from imgpipe_dagster.environment import read_environment
    from imgpipe_dagster.gpu_server.discovery import discover_endpoints

    return discover_endpoints([*read_environment().gpu_endpoints, *(extra or [])])


def probe_gpu_server(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> GpuServerStatus:
    try:
        health = fetch_health(url, timeout_s)
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


def collect(conn: psycopg.Connection, gpu_urls: list[str] | None = None) -> Status:
    """Everything the screen shows; ``gpu_urls`` None means the servers ``known_gpu_servers`` finds."""
    conn.execute("SET TIME ZONE 'UTC'")  # the per-minute view's labels match the minutes built here
    p = progress(conn)
    now = conn.execute("SELECT now()").fetchone()[0].astimezone(UTC)
    decision = last_decision(conn)
    urls = dict(p.urls_by_state) | {"total": p.urls_total, "unfinished": p.urls_unfinished}
    urls_servers = known_gpu_servers() if gpu_urls is None else [u.rstrip("/") for u in gpu_urls]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(urls_servers)))) as pool:
        servers = list(pool.map(probe_gpu_server, urls_servers))
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


# ----------------------------------------------------------------- rendering


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (nothing finished in the last hour)"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return (f"{days}d " if days else "") + f"{hours}h {rest // 60:02d}m"


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.1f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


def _memory(server: GpuServerStatus) -> str:
    if server.memory_used_bytes is None:
        return "-"
    if server.memory_kind == "rss":
        return f"{_bytes(server.memory_used_bytes)} rss"
    return f"{_bytes(server.memory_used_bytes)}/{_bytes(server.memory_total_bytes)}"


def _fit(text: str, width: int = SCREEN_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _bar(value: int, peak: int, width: int = 20) -> str:
    return "#" * (round(value / peak * width) if peak else 0)


def render(status: Status, width: int = SCREEN_WIDTH) -> str:
    u, s = status.urls, status.shards
    lines = [
        f"imgpipe status  {status.generated_at}  profile {status.profile.upper()}"
        + (" (default: no throttle decision yet)" if status.profile_source == "default" else "")
        + ("  PAUSED" if status.paused else ""),
        "",
        f"Backlog  URLs   {u['total']:>12,} total  {u['done']:>12,} done  {u['failed_permanent']:>10,} failed"
        f"  {u['unfinished']:>12,} to do",
        f"         detail {u['pending']:>12,} pending {u['leased']:>10,} leased  {u['failed_retryable']:>10,}"
        " waiting for a retry",
        f"         shards {s['total']:>12,} total  {s['done']:>12,} done  {s['unfinished']:>10,} unfinished",
        "",
        f"Rate     {status.urls_per_min_10m:,.1f} URLs/min (10 min)   {status.urls_per_min_1h:,.1f} URLs/min (1 h)"
        f"   ETA {duration(status.eta_s)}",
    ]
    peak = max((m["ok"] + m["failed"] for m in status.per_minute), default=0)
    for m in status.per_minute:
        done = m["ok"] + m["failed"]
        lines.append(f"  {m['minute']} {done:>7,} ({m['failed']:>5,} failed) {_bar(done, peak)}")
    lines += ["", "GPU servers"]
    if not status.gpu_servers:
        lines.append("  none found (no server started by the launcher; external ones: --gpu URL or "
                     f"${GPU_ENDPOINTS_ENV})")  # fmt: skip
    else:
        lines.append(f"  {'server':<26} {'state':<8} {'queue':>11} {'batch':>9} {'img/s':>7} {'memory':>13}"
                     f"  {'breaker':<9}")  # fmt: skip
    for g in status.gpu_servers:
        name = g.url.removeprefix("http://").removeprefix("https://")
        if not g.reachable:
            lines.append(_fit(f"  {name:<26} {'DOWN':<8} {g.error or ''}", width))
            continue
        queue = f"{g.queue_size}/{g.queue_capacity}"
        batch = f"{g.mean_batch_size:.1f}/{g.max_batch_size}"
        lines.append(_fit(
            f"  {name:<26} {g.status or '?':<8} {queue:>11} {batch:>9} {g.images_per_s:>7.2f} {_memory(g):>13}"
            f"  {g.breaker or 'no run':<9}" + (f" {g.error}" if g.error else ""), width))  # fmt: skip
    lines += [""]
    d = status.last_decision
    if d is None:
        lines.append("Throttle no throttle decision yet")
    else:
        lines.append(f"Throttle #{d['decision_id']} {d['decided_at']} {d['action']} -> {d['profile']}"
                     + (f", submitted {len(d['submitted'])} shard(s)" if d["submitted"] else ""))  # fmt: skip
        lines += _wrap(f"         reason: {d['reason']}", width, indent="         ")
    if status.top_errors_24h:
        errors = ", ".join(f"{c} {n:,}" for c, n in status.top_errors_24h)
        lines += _wrap(f"Errors   (24 h) {errors}", width, indent="         ")
    return "\n".join(_fit(line, width).rstrip() for line in lines)


def _wrap(text: str, width: int, indent: str) -> list[str]:
    """Word-wrap to ``width``; continuation lines start with ``indent``; at most three lines."""
    lines: list[str] = []
    current = text[: len(text) - len(text.lstrip())]  # keep the first line's own indent
    for word in text.split():
        if current.strip() and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = indent + word
        else:
            current = f"{current} {word}" if current.strip() else current + word
    lines.append(current)
    return lines[:3]


# ----------------------------------------------------------------- command


def cmd_status(args: argparse.Namespace) -> int:
    url = db.resolve_database_url()
    gpu_urls = None
    if args.gpu:
        gpu_urls = known_gpu_servers(args.gpu)
    while True:
        with db.connect(url) as conn:
            status = collect(conn, gpu_urls)
        if args.json:
            print(json.dumps(status.as_dict(), default=str), flush=True)
        else:
            screen = render(status)
            # ANSI home + clear keeps --watch flicker-free on a terminal
            print(("\x1b[H\x1b[2J" if args.watch else "") + screen, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.interval)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from imgpipe_dagster.cli import COMMANDS

    p = sub.add_parser("status", help="backlog, rate, ETA, GPU servers and the throttle on one screen")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the screen")
    p.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between --watch refreshes")
    p.add_argument("--gpu", action="append", metavar="URL",
                   help=f"also show this GPU server (repeatable; ${GPU_ENDPOINTS_ENV} works too)")  # fmt: skip
    COMMANDS["status"] = cmd_status
