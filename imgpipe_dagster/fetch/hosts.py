"""Hosts as the unit of health and politeness: admission, slow start, breaker, pauses and rate.

Every download first waits at its host's gate (:meth:`HostBook.admit`), holding none of the
fetcher's global slots while it waits. The gate admits in arrival order while the host has room:

- **concurrency**: a window that starts at 1 and doubles on every answer up to ``per_host_limit``
  (slow start), and drops to 1 on a failure without an answer, so a dead or hanging host sees one
  request at a time;
- **rate**: a token bucket of ``per_host_requests_per_s`` with a burst of ``per_host_limit``;
- **breaker**: ``host_failures_to_open`` consecutive failures without a usable answer (connect
  refused or timed out, DNS failure, no first byte, a body trickling under the minimum rate) open it; the host's URLs then come back HOST_DEFERRED with
  the seconds until the next probe. When that time comes, one request is the probe while the others
  wait for its outcome: an answer closes the breaker, a failure doubles the wait, and after
  ``host_probes_before_unreachable`` failed probes the host is unreachable (HOST_UNREACHABLE);
- **pause**: a 429 or 503 pauses the whole host for its Retry-After (or ``host_pause_default_s``)
  and halves its window; URLs arriving meanwhile come back HOST_DEFERRED until the pause ends;
- **queue length**: only when the fetcher's look-ahead is full and another host's URL needs the room
  (:meth:`HostBook.make_room`), the newest URL of a host whose queue would keep it waiting longer than
  ``host_queue_wait_s`` is deferred, so one slow or hanging host cannot fill the look-ahead. A URL
  arriving at a long queue simply waits there: with no other host asking for room (a corpus of one
  site, the end of a shard) deferring it would only idle the run. The estimate counts a request in
  flight as taking at least its age, so a hanging host shows at once. The one exception: while the
  look-ahead is full, a URL in hand whose own host has finished nothing for ``host_queue_wait_s``
  (:meth:`HostBook.stalled`) is deferred, since the URLs behind it in the input cannot be seen.

State lives as long as the fetcher (one run); a host's entry is kept while it is remembered as
broken or paused, and dropped when it is healthy and idle, so millions of hosts do not pile up.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field

from imgpipe_dagster.fetch.errors import ErrorClass, FetchError
from imgpipe_dagster.fetch.settings import FetchSettings

# failures without any answer from the host: these are its health, not the URL's
HOST_FAILURES = frozenset(
    {
        ErrorClass.CONNECT_REFUSED,
        ErrorClass.CONNECT_TIMEOUT,
        ErrorClass.DNS_FAILURE,
        ErrorClass.TTFB_TIMEOUT,
        ErrorClass.READ_TIMEOUT,
        ErrorClass.RESET,
        ErrorClass.DEADLINE,
        ErrorClass.TLS_ERROR,
    }
)
# failures after the host's headers that still say the host, not the URL, is unwell: a host whose
# bodies trickle does it for every URL (each would hold a slot for the grace period, three times)
STALLED_ANSWERS = frozenset({ErrorClass.TOO_SLOW})
# answers by which a host asks to be left alone for a while
SLOW_DOWN_STATUSES = frozenset({429, 503})
# weight of the newest sample in a host's running mean request time
_EWMA_WEIGHT = 0.2
# a URL deferred for its host's queue comes back no sooner than this
_MIN_QUEUE_DEFERRAL_S = 1.0


@dataclass
class Admission:
    """A host slot granted by :meth:`HostBook.admit`; hand it back with :meth:`HostBook.release`."""

    host: HostState
    probe: bool  # this request decides whether an open breaker closes
    started_at: float  # loop time it was admitted
    answered: bool = False  # the host answered this request (see HostBook.answered)


@dataclass
class HostState:
    key: str
    window: int = 1  # requests allowed in flight now (slow start up to per_host_limit)
    active: int = 0  # requests in flight now
    waiters: deque = field(default_factory=deque)  # futures of admissions, in arrival order
    tokens: float = 0.0
    tokens_at: float = 0.0  # loop time the token count was last brought up to date
    consecutive_failures: int = 0
    breaker_open: bool = False
    failed_probes: int = 0
    probing: bool = False  # a probe is in flight; the others wait for its outcome
    unreachable: bool = False
    blocked_until: float = 0.0  # breaker's next probe or a pause's end (loop time)
    mean_request_s: float = 0.0  # running mean of request time, to estimate queue waits
    active_started: list = field(default_factory=list)  # loop times the requests in flight began
    progress_at: float = 0.0  # loop time a request of this host last ended, or it last became busy
    timer: asyncio.TimerHandle | None = None  # wakes the gate when a token or a probe is due
    robots: object = None  # the host's parsed robots.txt (see robots.py), once fetched


class HostBook:
    """Per-host gates of one fetcher (one event loop)."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._hosts: dict[str, HostState] = {}

    def __len__(self) -> int:
        return len(self._hosts)

    def get(self, key: str) -> HostState | None:
        return self._hosts.get(key)

    def _state(self, key: str) -> HostState:
        host = self._hosts.get(key)
        if host is None:
            now = asyncio.get_running_loop().time()
            host = self._hosts[key] = HostState(key, tokens=float(self.settings.per_host_limit), tokens_at=now)
        return host

    @staticmethod
    def _busy(host: HostState) -> bool:
        return bool(host.active or host.waiters)

    async def admit(self, key: str) -> Admission:
        """Wait for a slot of host ``key``; raises HOST_DEFERRED or HOST_UNREACHABLE instead of waiting."""
        host = self._state(key)
        loop = asyncio.get_running_loop()
        self._refuse_early(host, loop.time())
        if not self._busy(host):
            host.progress_at = loop.time()  # the time a stalled host has finished nothing counts from here
        future: asyncio.Future[Admission] = loop.create_future()
        host.waiters.append(future)
        self._pump(host)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result(), health="other", failure=None)  # granted as we were cancelled
            self._forget_if_idle(host)
            raise

    def _refuse_early(self, host: HostState, now: float) -> None:
        """Deferral or failure decided without queueing (no request, no slot): the host is unreachable,
        or blocked by its breaker or a pause. A long queue alone never refuses here (see make_room)."""
        if host.unreachable:
            raise _unreachable(host)
        if host.blocked_until > now:
            raise _deferred(host, host.blocked_until - now)

    def make_room(self, for_key: str | None) -> bool:
        """The fetcher's look-ahead is full and a URL of host ``for_key`` is in hand: defer the newest
        URL waiting at another host when it is expected to wait longer than ``host_queue_wait_s``
        (the same rule as for a URL arriving there now). True when one was deferred."""
        longest: HostState | None = None
        longest_wait = self.settings.host_queue_wait_s
        for host in self._hosts.values():
            if host.key != for_key and host.waiters:
                wait = self._expected_wait(host, len(host.waiters) - 1)
                if wait > longest_wait:
                    longest, longest_wait = host, wait
        if longest is None:
            return False
        while longest.waiters:
            future = longest.waiters.pop()
            if not future.done():
                wait = max(self._expected_wait(longest, len(longest.waiters)), _MIN_QUEUE_DEFERRAL_S)
                future.set_exception(_deferred(longest, wait, why="queued behind its own host while others wait"))
                return True
        return False

    def stalled(self, key: str | None) -> FetchError | None:
        """HOST_DEFERRED for a URL of host ``key`` in hand while the fetcher's look-ahead is full, when
        that host holds URLs there, would keep this one waiting longer than ``host_queue_wait_s`` and
        has finished no request for as long (a hanging host at the head of the input); else None.
        A host that keeps finishing requests is never stalled, however long its queue."""
        host = self._hosts.get(key) if key is not None else None
        if host is None or not self._busy(host):
            return None
        limit = self.settings.host_queue_wait_s
        idle_s = asyncio.get_running_loop().time() - host.progress_at
        wait = self._expected_wait(host, len(host.waiters))
        if idle_s <= limit or wait <= limit:
            return None
        return _deferred(host, max(wait, _MIN_QUEUE_DEFERRAL_S), why=f"nothing finished for {idle_s:.0f}s")

    def _expected_wait(self, host: HostState, queued: int) -> float:
        if queued == 0:
            return 0.0
        # a healthy host is heading for its full window (slow start doubles it per answer)
        parallel = host.window if host.consecutive_failures else self.settings.per_host_limit
        # a request still in flight has taken at least its age: a new host that hangs shows it at once.
        # Once the host has answered, its mean decides: one slow URL of a busy host (a CDN serving
        # thousands of good images) must not make its whole queue look hours long.
        now = asyncio.get_running_loop().time()
        oldest_age = now - min(host.active_started) if host.active_started else 0.0
        request_s = host.mean_request_s if host.mean_request_s else oldest_age
        per_request = max(1.0 / self.settings.per_host_requests_per_s, request_s / max(parallel, 1))
        return queued * per_request

    def would_defer(self, key: str | None) -> bool:
        """True when a URL of host ``key`` arriving now would come back HOST_DEFERRED or
        HOST_UNREACHABLE at once (so it needs no room in the fetcher's look-ahead)."""
        host = self._hosts.get(key) if key is not None else None
        if host is None:
            return False
        return host.unreachable or host.blocked_until > asyncio.get_running_loop().time()

    def _refill(self, host: HostState, now: float) -> None:
        rate = self.settings.per_host_requests_per_s
        host.tokens = min(float(self.settings.per_host_limit), host.tokens + (now - host.tokens_at) * rate)
        host.tokens_at = now

    def _pump(self, host: HostState) -> None:
        """Grant, defer or fail the host's waiters, in order, as far as its state allows."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while host.waiters:
            future = host.waiters[0]
            if future.done():  # its task was cancelled
                host.waiters.popleft()
                continue
            if host.unreachable:
                host.waiters.popleft().set_exception(_unreachable(host))
                continue
            if host.blocked_until > now:
                host.waiters.popleft().set_exception(_deferred(host, host.blocked_until - now))
                continue
            if host.probing or host.active >= (1 if host.breaker_open else host.window):
                return  # a release or the probe's outcome pumps again
            self._refill(host, now)
            if host.tokens < 1.0:
                self._wake_at(host, now + (1.0 - host.tokens) / self.settings.per_host_requests_per_s)
                return
            host.tokens -= 1.0
            host.active += 1
            host.active_started.append(now)
            probe = host.breaker_open
            host.probing = probe
            host.waiters.popleft().set_result(Admission(host, probe, started_at=now))

    def _wake_at(self, host: HostState, when: float) -> None:
        if host.timer is not None and host.timer.when() <= when:
            return
        if host.timer is not None:
            host.timer.cancel()
        host.timer = asyncio.get_running_loop().call_at(when, self._woken, host)

    def _woken(self, host: HostState) -> None:
        host.timer = None
        self._pump(host)

    def answered(self, admission: Admission, *, status: int, robots: bool = False) -> None:
        """The host answered the URL's request (not robots.txt, not a 429/503): its window opens now,
        not when the body is done. Its health is judged when the slot comes back (release): a body
        that then trickles is no sign of health."""
        host = admission.host
        if robots or admission.answered or status in SLOW_DOWN_STATUSES:
            return
        admission.answered = True
        host.window = min(self.settings.per_host_limit, host.window * 2)
        self._pump(host)

    def release(
        self,
        admission: Admission,
        *,
        health: str,
        failure: FetchError | None,
        elapsed_s: float | None = None,
    ) -> None:
        """Hand a slot back with what the host did. ``health``: "answered" (any HTTP answer: an open
        breaker closes; a 429 or 503 in ``failure`` pauses the host), "failed" (no usable answer, or
        robots.txt unavailable: counts toward the breaker) or "other" (neither, e.g. an address
        refused before connecting)."""
        host = admission.host
        settings = self.settings
        loop = asyncio.get_running_loop()
        now = loop.time()
        host.active -= 1
        host.active_started.remove(admission.started_at)
        host.progress_at = now
        if admission.probe:
            host.probing = False
        if elapsed_s is not None:
            weight = _EWMA_WEIGHT if host.mean_request_s else 1.0  # the first sample is the mean
            host.mean_request_s += weight * (elapsed_s - host.mean_request_s)
        status = failure.http_status if failure is not None else None
        if health == "answered":
            host.consecutive_failures = 0
            host.breaker_open = False
            host.failed_probes = 0
            if status in SLOW_DOWN_STATUSES:
                pause = failure.retry_after if failure.retry_after is not None else settings.host_pause_default_s
                host.blocked_until = max(host.blocked_until, now + pause)
                host.window = max(1, host.window // 2)
        elif health == "failed":
            host.consecutive_failures += 1
            host.window = 1
            if admission.probe:
                host.failed_probes += 1
                if host.failed_probes >= settings.host_probes_before_unreachable:
                    host.unreachable = True
                else:
                    host.blocked_until = now + settings.host_probe_interval_s * 2**host.failed_probes
            elif host.consecutive_failures >= settings.host_failures_to_open and not host.breaker_open:
                host.breaker_open = True
                host.blocked_until = now + settings.host_probe_interval_s
        self._pump(host)  # queued URLs go now, or are deferred when the host just got blocked
        self._forget_if_idle(host)

    def _forget_if_idle(self, host: HostState) -> None:
        healthy = not (host.breaker_open or host.unreachable or host.consecutive_failures)
        paused = host.blocked_until > asyncio.get_running_loop().time()
        if healthy and not paused and host.active == 0 and not host.waiters and host.robots is None:
            if host.timer is not None:
                host.timer.cancel()
            self._hosts.pop(host.key, None)

    def keep(self, host: HostState) -> None:
        """Keep ``host``'s entry (it now holds a cached robots.txt)."""
        self._hosts.setdefault(host.key, host)


def _deferred(host: HostState, seconds: float, why: str | None = None) -> FetchError:
    if why is None:
        why = "breaker open until its next probe" if host.breaker_open else "host asked us to slow down"
    return FetchError(
        ErrorClass.HOST_DEFERRED,
        f"{host.key}: {why}; try again in {seconds:.1f}s",
        retry_after=math.ceil(seconds * 10) / 10,
    )


def _unreachable(host: HostState) -> FetchError:
    return FetchError(
        ErrorClass.HOST_UNREACHABLE,
        f"{host.key}: no answer through {host.failed_probes} probes after "
        f"{host.consecutive_failures} failures",
    )
