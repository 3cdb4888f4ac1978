"""A run's watchdog over the managed GPU servers it uses: a server whose process died is started again
with the same settings, on the same port, with backoff and a bounded number of restarts.

The run's router keeps the server's URL; while the server is down its breaker holds the requests
("Router waiting"), and once the restarted server answers the router resumes. Each step is reported
through ``report`` (the run log). Only servers this machine's launcher recorded are watched: external
servers are never started by a run, and a server stopped by ``imgpipe gpu-server stop`` (its record
removed) stays stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from imgpipe_dagster.gpu_server.launcher import Endpoint, GpuServerLauncher, ServerStartError, tail_of_log

log = logging.getLogger("imgpipe.gpu_server.watchdog")

CHECK_INTERVAL_S = 1.0
# The first restart waits this long after the death is noticed, each next one twice as long (capped).
FIRST_BACKOFF_S = 2.0
MAX_BACKOFF_S = 60.0
MAX_RESTARTS = 5  # per server and run: a server that keeps dying is left dead, and said so
LOG_LINES = 5  # of the dead server's log, in the report


@dataclass
class _Watched:
    endpoint: Endpoint
    restarts: int = 0
    dead_since: float | None = None
    next_try_at: float = 0.0
    given_up: bool = False
    stopped_by_operator: bool = False


class ServerWatchdog:
    """``with ServerWatchdog(launcher, endpoints, report):`` watches from a thread while the block runs."""

    def __init__(
        self,
        launcher: GpuServerLauncher,
        endpoints: Sequence[Endpoint],
        report: Callable[[str], None] | None = None,
        *,
        check_interval_s: float = CHECK_INTERVAL_S,
        first_backoff_s: float = FIRST_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
        self.launcher = launcher
        self.watched = [_Watched(endpoint) for endpoint in endpoints if endpoint.slot]
        self.report = report or log.warning
        self.check_interval_s = check_interval_s
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_restarts = max_restarts
        self.restarted: list[Endpoint] = []  # what this watchdog started, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-server-watchdog", daemon=True)

    def __enter__(self) -> ServerWatchdog:
        if self.watched:
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread.is_alive():
            # a restart in progress finishes first: it holds the slot's lock and a half-started server
            self._thread.join(timeout=self.launcher.startup_timeout_s + 60)

    def _loop(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            for watched in self.watched:
                if self._stop.is_set():
                    return
                try:
                    self.check(watched)
                except Exception as exc:  # the watchdog must outlive any one bad check
                    log.exception("GPU server watchdog: checking %s failed: %s", watched.endpoint.url, exc)

    def check(self, watched: _Watched) -> None:
        """One look at one server: notice a death, restart when its backoff is over."""
        if watched.given_up or watched.stopped_by_operator:
            return
        endpoint = watched.endpoint
        record, alive = self.launcher.record_of(endpoint.slot)
        if record is None:
            watched.stopped_by_operator = True
            self.report(f"GPU server {endpoint.url}: stopped by an operator (no record); not restarted")
            return
        if alive:
            if watched.dead_since is not None and record.get("pid") != endpoint.pid:
                self.report(f"GPU server {endpoint.url}: restarted by another caller (pid {record.get('pid')})")
                watched.endpoint = _with_pid(endpoint, record)
                watched.dead_since = None
            return
        now = time.monotonic()
        if watched.dead_since is None and watched.restarts >= self.max_restarts:
            watched.given_up = True
            self.report(f"GPU server {endpoint.url} died again after {self.max_restarts} restarts in this run: "
                        "left dead (see `imgpipe status` and its log)")  # fmt: skip
            return
        if watched.dead_since is None:
            watched.dead_since = now
            watched.next_try_at = now + self._backoff(watched.restarts)
            self.report(
                f"GPU server {endpoint.url} ({endpoint.device}, pid {record.get('pid')}) died; restart "
                f"{watched.restarts + 1} of {self.max_restarts} in {self._backoff(watched.restarts):.0f} s with "
                f"the same settings (hash {record.get('settings_hash')}). Last log lines:\n"
                f"{tail_of_log(record.get('log', ''), LOG_LINES)}"
            )
        if now < watched.next_try_at:
            return
        if watched.restarts >= self.max_restarts:  # its restarts failed to start it
            watched.given_up = True
            self.report(f"GPU server {endpoint.url}: {self.max_restarts} restarts failed; left dead")
            return
        watched.restarts += 1
        started = time.monotonic()
        try:
            revived = self.launcher.revive(endpoint)
        except ServerStartError as exc:
            watched.next_try_at = time.monotonic() + self._backoff(watched.restarts)
            first_line = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            self.report(f"GPU server {endpoint.url}: restart {watched.restarts} of {self.max_restarts} failed "
                        f"({first_line}); next try in {self._backoff(watched.restarts):.0f} s")  # fmt: skip
            return
        watched.dead_since = None
        if revived is None:  # someone else was faster, or an operator removed it meanwhile
            return
        watched.endpoint = revived
        self.restarted.append(revived)
        self.report(f"GPU server {revived.url} restarted ({revived.device}, pid {revived.pid}, settings "
                    f"{revived.settings_hash}): ready after {time.monotonic() - started:.1f} s "
                    f"(restart {watched.restarts} of {self.max_restarts})")  # fmt: skip

    def _backoff(self, restarts_done: int) -> float:
        return min(self.first_backoff_s * (2**restarts_done), self.max_backoff_s)


def _with_pid(endpoint: Endpoint, record: dict) -> Endpoint:
    return replace(endpoint, pid=int(record.get("pid") or endpoint.pid), settings_hash=record.get("settings_hash") or "")
