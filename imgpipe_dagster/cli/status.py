"""`imgpipe status`: the whole pipeline on one screen (the legacy redis-cli / psql / curl checks in one).

The data comes from imgpipe_dagster.status.collect; this module draws it. ``--json`` prints the same
data as one JSON object; ``--watch`` redraws it every few seconds. Every line fits 100 columns.
"""

from __future__ import annotations

import argparse
import json
import time

from imgpipe_dagster.environment import GPU_ENDPOINTS_ENV
from imgpipe_dagster.status import (
    GpuServerStatus,
    Status,
    collect,
    format_eta,
    known_gpu_servers,
)
from imgpipe_dagster.store import database as db

SCREEN_WIDTH = 100


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="backlog, rate, ETA, GPU servers and the throttle on one screen")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the screen")
    p.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between --watch refreshes")
    p.add_argument("--gpu", action="append", metavar="URL",
                   help=f"also show this GPU server (repeatable; ${GPU_ENDPOINTS_ENV} works too)")  # fmt: skip
    p.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    url = db.resolve_database_url()
    gpu_urls = None
    if args.gpu:
        gpu_urls = known_gpu_servers(args.gpu, registry_url=url)
    while True:
        with db.connect(url) as conn:
            status = collect(conn, gpu_urls, include_dead=True, registry_url=url)
        if args.json:
            print(json.dumps(status.as_dict(), default=str), flush=True)
        else:
            screen = render(status)
            # ANSI home + clear keeps --watch flicker-free on a terminal
            print(("\x1b[H\x1b[2J" if args.watch else "") + screen, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.interval)


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
        f"   ETA {format_eta(status.eta_s)}",
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
            lines.append(_fit(f"  {name:<26} {'DEAD' if g.status == 'dead' else 'DOWN':<8} {g.error or ''}", width))
            lines += [_fit(f"    | {line}", width) for line in g.log_tail]
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
