"""Connection guard of the GPU server: deadlines for slow clients and a cap on open connections.

uvicorn has knobs for idle keep-alive connections and for concurrent requests, but none for a client
that opens a connection and then sends its headers or body a byte at a time (slowloris), or never
sends anything (half-open): each holds a file descriptor for ever, and enough of them starve the
server of descriptors until ``/health`` stops answering. ``guarded_protocol`` extends uvicorn's
httptools protocol with

- a deadline for the request head (``header_timeout_s``, from the connection's start or from the first
  byte of a request on a kept-alive connection) and then for the body (``body_timeout_s``): a client
  that misses one is disconnected;
- a cap on open connections (``max_connections``, lowered below the process's open-file limit). A
  connection beyond it evicts the oldest connection that has not yet sent a whole request head (a
  slow or idle client, most likely the attack), so a prompt client such as a ``/health`` probe still
  gets in while the cap is full of laggards; when every connection is busy with a real request, the
  newcomer is closed instead. Either way a descriptor is freed at once.

Dropped connections are counted (``GuardCounters``) and logged at most once per ``LOG_EVERY_S``, so a
flood writes a handful of lines, not one per connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("imgpipe_dagster.gpu_server")

# Descriptors kept free for the model's files, the log, sockets to the GPU driver and the like.
DESCRIPTOR_RESERVE = 128
# Least seconds between two log lines about dropped connections.
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


@dataclass
class GuardCounters:
    """Connections dropped since the start, by reason (read by tests and the log line)."""

    slow_headers: int = 0
    slow_bodies: int = 0
    evicted: int = 0
    over_cap: int = 0
    logged_at: float = 0.0

    def note(self, reason: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        now = time.monotonic()
        if now - self.logged_at >= LOG_EVERY_S:
            self.logged_at = now
            log.warning("connections dropped so far: %d slow headers, %d slow bodies, %d evicted for newer "
                        "ones, %d refused over the cap", self.slow_headers, self.slow_bodies, self.evicted,
                        self.over_cap)  # fmt: skip


def connection_cap(wanted: int, reserve: int = DESCRIPTOR_RESERVE) -> int:
    """``wanted``, lowered so that open connections never take the last descriptors of the process."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - reserve))


def guarded_protocol(limits: ConnectionLimits, counters: GuardCounters) -> type[asyncio.Protocol]:
    """An ``http`` protocol class for ``uvicorn.Config`` that enforces ``limits``."""
    # Connections still waiting for a whole request head, oldest first (a dict keeps insertion order).
    awaiting_head: dict[GuardedHttpProtocol, None] = {}

    class GuardedHttpProtocol(HttpToolsProtocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                if not awaiting_head:
                    counters.note("over_cap")
                    transport.abort()  # frees the descriptor now; connection_lost tidies up
                    return
                oldest = next(iter(awaiting_head))
                awaiting_head.pop(oldest)
                counters.note("evicted")
                oldest.transport.abort()
            awaiting_head[self] = None
            self._arm(limits.header_timeout_s, "slow_headers")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(limits.header_timeout_s, "slow_headers")  # next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            awaiting_head.pop(self, None)
            super().on_headers_complete()
            self._arm(limits.body_timeout_s, "slow_bodies")

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()  # the request is in: answering it has no deadline here

        def connection_lost(self, exc: Exception | None) -> None:
            awaiting_head.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float, reason: str) -> None:
            self._disarm()
            self.deadline = self.loop.call_later(seconds, self._expire, reason)

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _expire(self, reason: str) -> None:
            self.deadline = None
            if self.transport is not None and not self.transport.is_closing():
                counters.note(reason)
                # A request being read sees http.disconnect (ClientDisconnect in the app): one log line.
                self.transport.close()

    return GuardedHttpProtocol
