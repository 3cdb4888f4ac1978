"""Whether a run still lives, read from the database alone (no PIDs, no launcher).

A shard run keeps a row in ``run_heartbeats`` and renews it, with its URL leases, every quarter of its
lease time. A run that Dagster still calls in progress is *dead* when

- its heartbeat expired more than ``grace_s`` ago, or
- it has no heartbeat row (a run of an older version) but holds URL leases that all expired more than
  ``grace_s`` ago: nobody renews them.

That holds for any launcher (a local subprocess, ``dagster job execute``, a Celery worker, a pod), so
one detector serves them all; the Dagster side (sensors/dead_runs.py) only lists the runs in progress
and reports the failure.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg

from imgpipe_dagster.store.work import release_leases


@dataclass(frozen=True)
class DeadRun:
    run_id: str
    # "heartbeat" (its heartbeat expired) or "leases" (no heartbeat; its URL leases expired unrenewed)
    evidence: str
    # when the evidence expired: the heartbeat's or the last URL lease's expiry
    expired_at: datetime
    leased_urls: int
    host: str | None = None
    pid: int | None = None

    def describe(self) -> str:
        where = f" (last seen on {self.host}, pid {self.pid})" if self.host else ""
        what = "heartbeat" if self.evidence == "heartbeat" else "URL leases"
        return (f"run {self.run_id}{where}: its {what} stopped being renewed and expired at "
                f"{self.expired_at.isoformat(timespec='seconds')}; {self.leased_urls} leased URLs")  # fmt: skip


@dataclass(frozen=True)
class LeaseHolder:
    """Another run's live leases on the shards a run is waiting for."""

    owner: str
    urls: int
    expires_at: datetime  # the latest of its leases: claimable by then unless it renews them
    heartbeat_at: datetime | None  # its last heartbeat (None: no heartbeat row)


def beat(conn: psycopg.Connection, run_id: str, shard_ids: Sequence[str], ttl_s: float) -> None:
    """Create or renew the run's heartbeat: alive for ``ttl_s`` more seconds."""
    conn.execute(
        "INSERT INTO run_heartbeats (run_id, shard_ids, host, pid, expires_at)"
        " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))"
        " ON CONFLICT (run_id) DO UPDATE SET beat_at = now(), expires_at = EXCLUDED.expires_at,"
        " host = EXCLUDED.host, pid = EXCLUDED.pid",
        (run_id, list(shard_ids), socket.gethostname(), os.getpid(), ttl_s),
    )
    conn.commit()


def end(conn: psycopg.Connection, run_id: str) -> None:
    """The run's body ended (finished or raised): it is no longer a candidate for death."""
    conn.execute("DELETE FROM run_heartbeats WHERE run_id = %s", (run_id,))
    conn.commit()


_DEAD = """
WITH candidate AS (SELECT unnest(%(run_ids)s::text[]) AS run_id),
leases AS (
    SELECT lease_owner AS run_id, count(*) AS leased, max(lease_expires_at) AS last_expiry
      FROM corpus_urls
     WHERE state = 'leased' AND lease_owner = ANY(%(run_ids)s)
     GROUP BY lease_owner
)
SELECT c.run_id,
       CASE WHEN h.run_id IS NOT NULL THEN 'heartbeat' ELSE 'leases' END,
       coalesce(h.expires_at, l.last_expiry), coalesce(l.leased, 0), h.host, h.pid
  FROM candidate c
  LEFT JOIN run_heartbeats h ON h.run_id = c.run_id
  LEFT JOIN leases l ON l.run_id = c.run_id
 WHERE (h.run_id IS NOT NULL AND h.expires_at < now() - make_interval(secs => %(grace_s)s))
    OR (h.run_id IS NULL AND l.leased > 0 AND l.last_expiry < now() - make_interval(secs => %(grace_s)s))
 ORDER BY c.run_id
"""


def dead_runs(conn: psycopg.Connection, in_progress: Sequence[str], grace_s: float = 0.0) -> list[DeadRun]:
    """Of the runs Dagster calls in progress, those that stopped renewing their heartbeat or leases."""
    if not in_progress:
        return []
    rows = conn.execute(_DEAD, {"run_ids": list(in_progress), "grace_s": grace_s}).fetchall()
    conn.commit()
    return [DeadRun(*row) for row in rows]


def reclaim(conn: psycopg.Connection, run_id: str) -> int:
    """Give a dead run's URLs back to the pool (pending, no retry spent) and drop its heartbeat.
    Returns the URLs released. Idempotent: the run-failure sensor may release the same run again."""
    released = release_leases(conn, run_id)
    end(conn, run_id)
    return released


def lease_holders(conn: psycopg.Connection, shard_ids: Sequence[str], exclude: str) -> list[LeaseHolder]:
    """Who holds live leases on these shards besides ``exclude``, and until when."""
    rows = conn.execute(
        "SELECT c.lease_owner, count(*), max(c.lease_expires_at), max(h.beat_at)"
        "  FROM corpus_urls c LEFT JOIN run_heartbeats h ON h.run_id = c.lease_owner"
        " WHERE c.shard_id = ANY(%s) AND c.state = 'leased' AND c.lease_expires_at >= now()"
        "   AND c.lease_owner IS DISTINCT FROM %s"
        " GROUP BY c.lease_owner ORDER BY 3",
        (list(shard_ids), exclude),
    ).fetchall()
    conn.commit()
    return [LeaseHolder(owner, urls, expires_at, beat_at) for owner, urls, expires_at, beat_at in rows]
