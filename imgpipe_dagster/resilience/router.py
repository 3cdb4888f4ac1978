"""Route GPU requests to the server with the most free capacity; wait, visibly, when every server is out.

Each endpoint has its own AdaptiveLimiter and CircuitBreaker. ``route()`` picks, among endpoints
whose breaker admits a call, the one with the most free slots (limit - in flight), and never lets
the run exceed ``max_concurrent_requests`` in flight in total (0 = no per-run cap).

When every endpoint's breaker is open, callers wait without a deadline: a GPU server being down is
never a URL's fault, so nothing is marked failed. The wait is visible as ``router.waiting``,
``router.all_out``, a log line when it starts, every ``wait_log_interval_s`` while it lasts, and when
it ends, and in ``snapshot()``. When servers are up but full, waiting counts against
``queue_timeout`` (QueueTimeout) and the number of waiters against ``resilience_max_queue`` per
endpoint (QueueFull): both are back-pressure signals, not URL failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from imgpipe_dagster.resilience.breaker import BreakerState, CircuitBreaker, Permit
from imgpipe_dagster.resilience.limiter import AdaptiveLimiter, LossKind, QueueFull, QueueTimeout
from imgpipe_dagster.resilience.settings import BreakerSettings, LimiterSettings

logger = logging.getLogger("imgpipe.resilience")


@dataclass
class RoutedEndpoint:
    url: str
    name: str
    limiter: AdaptiveLimiter
    breaker: CircuitBreaker


class Lease:
    """One admitted request to ``endpoint``. Report one outcome; the slot is released on exit."""

    def __init__(self, target: RoutedEndpoint, permit: Permit, started_at: float, clock: Callable[[], float]):
        self._target = target
        self._permit = permit
        self._started_at = started_at
        self._clock = clock
        self.reported = False

    @property
    def endpoint(self) -> str:
        return self._target.url

    @property
    def name(self) -> str:
        return self._target.name

    def elapsed(self) -> float:
        return self._clock() - self._started_at

    def success(self, latency_s: float | None = None) -> None:
        """The server answered (including a URL-level rejection such as an undecodable image)."""
        latency = self.elapsed() if latency_s is None else latency_s
        self._report()
        self._target.limiter.record_success(latency)
        self._permit.success(latency)

    def loss(self, kind: LossKind, latency_s: float | None = None) -> None:
        """The server was overloaded or failed: "429", "timeout" or "error"."""
        latency = self.elapsed() if latency_s is None else latency_s
        self._report()
        self._target.limiter.record_loss(kind, latency)
        self._permit.failure(kind)

    def cancel(self) -> None:
        """The outcome says nothing about the server (e.g. the caller was cancelled)."""
        self._report()
        self._permit.cancel()

    def _report(self) -> None:
        if self.reported:
            raise RuntimeError("outcome already reported for this lease")
        self.reported = True


class Router:
    def __init__(
        self,
        endpoints: list[str],
        limiter_settings: LimiterSettings,
        breaker_settings: BreakerSettings,
        *,
        names: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        wait_log_interval_s: float = 30.0,
    ) -> None:
        if not endpoints:
            raise ValueError("Router needs at least one endpoint")
        names = names or [f"gpu{index}" for index in range(len(endpoints))]
        if len(names) != len(endpoints):
            raise ValueError("names and endpoints differ in length")
        self.limiter_settings = limiter_settings
        self.breaker_settings = breaker_settings
        self._clock = clock
        self._sleep = sleep
        self.wait_log_interval_s = wait_log_interval_s
        self.endpoints = [
            RoutedEndpoint(
                url=url,
                name=name,
                limiter=AdaptiveLimiter(name, self.limiter_settings, clock=clock, sleep=sleep),
                breaker=CircuitBreaker(name, self.breaker_settings, clock=clock),
            )
            for url, name in zip(endpoints, names, strict=True)
        ]
        for target in self.endpoints:
            target.limiter.add_capacity_listener(self._wake)
        self._queue: deque[object] = deque()
        self._change: asyncio.Future[None] | None = None
        self._all_out_since: float | None = None
        self._last_wait_log_at = 0.0
        self.counters: dict[str, int] = {
            "routed": 0,
            "waited": 0,
            "all_out_episodes": 0,
            "queue_full": 0,
            "queue_timeouts": 0,
        }

    # ----------------------------------------------------------------- state

    @property
    def waiting(self) -> int:
        """Requests waiting for an endpoint right now."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return sum(target.limiter.in_flight for target in self.endpoints)

    @property
    def all_out(self) -> bool:
        """True while no endpoint's breaker admits calls."""
        return not any(target.breaker.available() for target in self.endpoints)

    # ---------------------------------------------------------------- routing

    @asynccontextmanager
    async def route(self) -> AsyncIterator[Lease]:
        """``async with router.route() as lease:`` call ``lease.endpoint``, then report the outcome."""
        target, permit = await self._acquire()
        lease = Lease(target, permit, self._clock(), self._clock)
        try:
            yield lease
        finally:
            if not lease.reported:
                lease.cancel()
            target.limiter.release()

    async def _acquire(self) -> tuple[RoutedEndpoint, Permit]:
        ticket = object()
        max_queue = self.limiter_settings.resilience_max_queue * len(self.endpoints)
        if len(self._queue) >= max_queue:
            self.counters["queue_full"] += 1
            raise QueueFull(f"router: {len(self._queue)} requests already waiting (limit {max_queue})")
        self._queue.append(ticket)
        busy_waited = 0.0
        try:
            while True:
                if self._queue[0] is ticket:
                    picked = self._pick()
                    if picked is not None:
                        self._queue.popleft()
                        self._wake()  # the next in line may also find room
                        target, permit, delay = picked
                        await self._pace(target, permit, delay)
                        self.counters["routed"] += 1
                        self._note_back_if_was_out()
                        return target, permit
                all_out = self.all_out
                if all_out:
                    self._note_all_out()
                else:
                    self._note_back_if_was_out()
                    if busy_waited >= self.limiter_settings.queue_timeout:
                        self.counters["queue_timeouts"] += 1
                        raise QueueTimeout(
                            f"router: no free slot within queue_timeout={self.limiter_settings.queue_timeout:g}s"
                        )
                if busy_waited == 0.0:
                    self.counters["waited"] += 1
                began = self._clock()
                await self._wait_for_change(self._wait_timeout(all_out, busy_waited))
                if not all_out:
                    busy_waited += max(self._clock() - began, 1e-9)
        finally:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._wake()

    def _pick(self) -> tuple[RoutedEndpoint, Permit, float] | None:
        cap = self.limiter_settings.max_concurrent_requests
        if cap and self.in_flight >= cap:
            return None
        ranked = sorted(self.endpoints, key=lambda target: -target.limiter.free)
        for target in ranked:
            if target.limiter.free <= 0:
                break
            permit = target.breaker.try_acquire()
            if permit is None:
                continue
            delay = target.limiter.try_acquire_nowait()
            if delay is None:
                permit.cancel()
                continue
            return target, permit, delay
        return None

    async def _pace(self, target: RoutedEndpoint, permit: Permit, delay: float) -> None:
        if delay <= 0:
            return
        try:
            await self._sleep(delay)
        except BaseException:
            permit.cancel()
            target.limiter.release()
            raise

    def _wait_timeout(self, all_out: bool, busy_waited: float) -> float:
        # Open breakers turn half-open by the clock alone, so wake up when the first one may.
        reopen_in = [
            target.breaker.seconds_until_half_open()
            for target in self.endpoints
            if target.breaker.state is BreakerState.OPEN
        ]
        candidates = [self.wait_log_interval_s] + reopen_in
        if not all_out:
            candidates.append(self.limiter_settings.queue_timeout - busy_waited)
        return max(0.001, min(candidates))

    async def _wait_for_change(self, timeout: float) -> None:
        if self._change is None or self._change.done():
            self._change = asyncio.get_running_loop().create_future()
        change = self._change
        try:
            await asyncio.wait_for(asyncio.shield(change), timeout)
        except TimeoutError:
            pass

    def _wake(self) -> None:
        if self._change is not None and not self._change.done():
            self._change.set_result(None)

    # ------------------------------------------------------------ visibility

    def _describe_out(self) -> str:
        parts = []
        for target in self.endpoints:
            snap = target.breaker.snapshot()
            parts.append(f"{target.name} {snap['state']} {snap['since_s']:.0f}s")
        return ", ".join(parts)

    def _note_all_out(self) -> None:
        now = self._clock()
        if self._all_out_since is None:
            self._all_out_since = now
            self._last_wait_log_at = now
            self.counters["all_out_episodes"] += 1
            logger.warning(
                "Router waiting: all %d GPU servers out (%s); %d requests waiting, none marked failed",
                len(self.endpoints), self._describe_out(), self.waiting,
            )
        elif now - self._last_wait_log_at >= self.wait_log_interval_s:
            self._last_wait_log_at = now
            logger.warning(
                "Router waiting %.0fs: all %d GPU servers out (%s); %d requests waiting",
                now - self._all_out_since, len(self.endpoints), self._describe_out(), self.waiting,
            )

    def _note_back_if_was_out(self) -> None:
        if self._all_out_since is None:
            return
        waited = self._clock() - self._all_out_since
        self._all_out_since = None
        up = [target.name for target in self.endpoints if target.breaker.available()]
        logger.info("Router resumed after %.0fs: %s admitting; %d requests waiting", waited, ", ".join(up), self.waiting)

    def snapshot(self) -> dict[str, object]:
        """Plain data for sensors and metrics."""
        return {
            "waiting": self.waiting,
            "all_out": self._all_out_since is not None,
            "all_out_for_s": round(self._clock() - self._all_out_since, 3) if self._all_out_since is not None else 0.0,
            "in_flight": self.in_flight,
            "max_concurrent_requests": self.limiter_settings.max_concurrent_requests,
            "counters": dict(self.counters),
            "endpoints": [
                {
                    "name": target.name,
                    "url": target.url,
                    "limiter": target.limiter.snapshot(),
                    "breaker": target.breaker.snapshot(),
                }
                for target in self.endpoints
            ],
        }
