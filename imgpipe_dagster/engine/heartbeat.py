"""The run's heartbeat: a thread that renews ``run_heartbeats`` while the run's process lives.

It starts before anything slow (GPU servers starting, the model loading), so a run that dies at any
point of its body leaves an expiring heartbeat behind (store/liveness.py reads it). It has its own
connection: a run whose pool is busy or broken must not look dead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import psycopg

from imgpipe_dagster.store import liveness

log = logging.getLogger("imgpipe.engine.heartbeat")


class RunHeartbeat:
    """``with RunHeartbeat(url, run_id, shards, ttl_s):`` beats every ttl_s / 4, ends the row on exit."""

    def __init__(self, database_url: str, run_id: str, shard_ids: Sequence[str], ttl_s: float) -> None:
        self.database_url = database_url
        self.run_id = run_id
        self.shard_ids = list(shard_ids)
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id[:8]}", daemon=True)
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> RunHeartbeat:
        self._beat()  # the first beat before the caller goes on: the row exists from now on
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl_s)
        try:
            with psycopg.connect(self.database_url, connect_timeout=10) as conn:
                liveness.end(conn, self.run_id)
        except psycopg.Error as exc:  # the row expires by itself; the detector then sees no leases left
            log.warning("ending the heartbeat of run %s failed: %s", self.run_id, exc.__class__.__name__)
        if self._conn is not None:
            self._conn.close()

    def _beat(self) -> None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.database_url, connect_timeout=10)
            liveness.beat(self._conn, self.run_id, self.shard_ids, self.ttl_s)
        except psycopg.Error as exc:  # the next beat tries again; the heartbeat outlives a few misses
            log.warning("run heartbeat failed: %s", exc.__class__.__name__)
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            self._beat()
