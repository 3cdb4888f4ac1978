"""The registry of GPU servers in the project database (table ``gpu_servers``, migration 005).

Every GPU server, managed by a run's launcher or started by hand on any machine, writes its row when
it starts and renews ``last_seen`` every ``HEARTBEAT_S`` seconds (gpu_server/registration.py). The
live set is the rows seen within ``LIVE_WINDOW_S``, measured on the database's clock, so machines
with skewed clocks agree. A clean exit deletes the row; a killed server drops out of the live set
once the window has passed, and its row is overwritten when a server comes back on that URL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from datetime import datetime

import psycopg
from psycopg import sql

log = logging.getLogger("imgpipe.store")

# How often a server renews its row.
HEARTBEAT_S = 5.0
# A server is live while its last beat is younger than this: three beats may be missed (a busy
# database, a long garbage collection) before it leaves the set.
LIVE_WINDOW_S = 3 * HEARTBEAT_S


@dataclass(frozen=True)
class RegisteredServer:
    url: str
    api: str
    model: str
    model_path: str
    settings_hash: str
    device: str
    hostname: str
    pid: int
    status: str
    max_batch_images: int
    max_inference_batch_size: int
    max_concurrent_generations: int
    queue_capacity: int
    queue_size: int
    processed: int
    started_at: datetime
    # set by the database on every beat; None in a row not written yet
    last_seen: datetime | None = None


_COLUMNS = [item.name for item in fields(RegisteredServer)]
_WRITTEN = [name for name in _COLUMNS if name != "last_seen"]


def register(conn: psycopg.Connection, server: RegisteredServer) -> None:
    """Write (or take over) the row of ``server.url`` and stamp it seen now."""
    columns = [sql.Identifier(name) for name in _WRITTEN]
    updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(column) for column in columns[1:])
    statement = sql.SQL(
        "INSERT INTO gpu_servers ({columns}, last_seen) VALUES ({values}, now())"
        " ON CONFLICT (url) DO UPDATE SET {updates}, last_seen = now()"
    ).format(columns=sql.SQL(", ").join(columns), values=sql.SQL(", ").join(sql.Placeholder() * len(columns)),
             updates=updates)  # fmt: skip
    conn.execute(statement, [getattr(server, name) for name in _WRITTEN])


def beat(conn: psycopg.Connection, url: str, pid: int, status: str, queue_size: int, processed: int) -> bool:
    """Renew the row of this process; False when it is gone (deleted, or taken over by another
    process on the same URL), so the caller registers again."""
    row = conn.execute(
        "UPDATE gpu_servers SET last_seen = now(), status = %s, queue_size = %s, processed = %s"
        " WHERE url = %s AND pid = %s RETURNING url",
        (status, queue_size, processed, url, pid),
    ).fetchone()
    return row is not None


def deregister(conn: psycopg.Connection, url: str, pid: int) -> None:
    """Remove the row of this process (not a successor's on the same URL)."""
    conn.execute("DELETE FROM gpu_servers WHERE url = %s AND pid = %s", (url, pid))


def live_servers(
    conn: psycopg.Connection, window_s: float = LIVE_WINDOW_S, *, ready_only: bool = False
) -> list[RegisteredServer]:
    """Servers seen within ``window_s`` seconds, oldest first; none when the table does not exist yet
    (a database not migrated to 005 has no registered servers)."""
    statement = sql.SQL(
        "SELECT {columns} FROM gpu_servers WHERE last_seen > now() - make_interval(secs => %s)"
        " AND (status = 'ready' OR NOT %s) ORDER BY started_at, url"
    ).format(columns=sql.SQL(", ").join(sql.Identifier(name) for name in _COLUMNS))
    try:
        rows = conn.execute(statement, (window_s, ready_only)).fetchall()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        return []
    return [RegisteredServer(*row) for row in rows]


def live_server_urls(
    database_url: str, window_s: float = LIVE_WINDOW_S, *, model: str | None = None, ready_only: bool = False
) -> list[str]:
    """Base URLs of the live servers (of ``model`` when given); [] when the database cannot be reached,
    so a discovery that includes the registry never fails on it."""
    try:
        with psycopg.connect(database_url, connect_timeout=5, autocommit=True) as conn:
            servers = live_servers(conn, window_s, ready_only=ready_only)
    except psycopg.OperationalError as error:
        log.warning("GPU server registry not readable (%s): only listed and local servers are used",
                    str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        return []
    return [server.url for server in servers if model is None or server.model == model]
