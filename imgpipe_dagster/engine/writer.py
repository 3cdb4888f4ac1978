"""The outcome writer: outcomes gathered into chunks and written by COPY (store.work.write_outcomes),
a bounded number of chunks at once, each retried until it lands (a failed write rolled back, so
writing it again is safe)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from psycopg_pool import ConnectionPool

from imgpipe_dagster.store import work
from imgpipe_dagster.store.versions import UNVERSIONED
from imgpipe_dagster.store.work import UrlOutcome

log = logging.getLogger("imgpipe.engine")

# tries of one chunk before the run fails (about five minutes of backoff in all)
WRITE_TRIES = 10


class OutcomeWriter:
    def __init__(
        self,
        pool: ConnectionPool,
        owner: str,
        chunk_size: int,
        max_concurrent_chunks: int,
        on_written: Callable[[list[UrlOutcome], float], None],
        analysis_version: str = UNVERSIONED,
    ) -> None:
        self.pool = pool
        self.owner = owner
        self.analysis_version = analysis_version  # the version result rows are written under
        self.chunk_size = chunk_size
        # called with each chunk once it is stored, and the seconds the write took
        self.on_written = on_written
        self._slots = asyncio.Semaphore(max_concurrent_chunks)
        self._pending: list[UrlOutcome] = []
        self._tasks: set[asyncio.Task] = set()

    def emit(self, outcome: UrlOutcome) -> None:
        self._pending.append(outcome)
        if len(self._pending) >= self.chunk_size:
            self._start(self._take_chunk())

    async def flush(self, wait: bool = False) -> None:
        """Start writing everything gathered; with ``wait``, return once every write landed."""
        while self._pending:
            self._start(self._take_chunk())
        if wait and self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def flush_every(self, interval_s: float) -> None:
        """Keep a slow trickle of outcomes from waiting for a full chunk."""
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()

    def _take_chunk(self) -> list[UrlOutcome]:
        chunk, self._pending = self._pending[: self.chunk_size], self._pending[self.chunk_size :]
        return chunk

    def _start(self, chunk: list[UrlOutcome]) -> None:
        task = asyncio.create_task(self._write(chunk))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, chunk: list[UrlOutcome]) -> None:
        async with self._slots:
            started = time.monotonic()
            for attempt in range(1, WRITE_TRIES + 1):
                try:
                    await asyncio.to_thread(self._write_now, chunk)
                    break
                except Exception as exc:  # the transaction rolled back: writing again is safe
                    if attempt == WRITE_TRIES:
                        raise
                    log.warning("writing %d outcomes failed (%s: %s); retrying", len(chunk),
                                exc.__class__.__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
                    await asyncio.sleep(min(0.2 * 2**attempt, 10.0))
        self.on_written(chunk, time.monotonic() - started)

    def _write_now(self, chunk: list[UrlOutcome]) -> None:
        with self.pool.connection() as conn:
            work.write_outcomes(conn, self.owner, chunk, self.analysis_version)
