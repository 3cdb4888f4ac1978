"""Adaptive concurrency limiter for one GPU server.

Why our own: the Python limiters we checked pace a fixed rate (``aiolimiter`` is a leaky bucket
on req/s; ``aiometer`` caps concurrency and rate at fixed values) and none adapts a concurrency
limit to latency and losses, which is what the reliability rules ask for (AIMD on requests in
flight, Little's law). Netflix's ``concurrency-limits`` does, but it is Java.

How it works (docs/RESILIENCE.md says the same for users):

* The controlled quantity is the number of requests in flight, a float ``limit`` whose integer
  part is enforced. It lives in ``[min_limit, max_limit]``; the legacy rates become limits by
  Little's law at the reference latency ``resilience_max_concurrent / resilience_max_rate``
  (the latency at which the legacy ceiling concurrency would deliver the legacy ceiling rate).
* ``resilience_max_rate`` stays a ceiling in requests/s: starts are spaced at least
  ``1 / resilience_max_rate`` apart.
* Losses (429, timeout, server error) decrease the limit at once, by ``rate_decrease_factor``
  or, when the lost request took longer than ``critical_threshold_ms``, by
  ``rate_critical_decrease_factor``. One congestion episode decreases once: a loss whose
  request started before the latest decrease does not decrease again. A loss is never a
  latency sample.
* Every ``rate_adjustment_interval`` seconds (checked when a request completes) the mean latency
  of the completions since the previous adjustment (the last ``rate_window_size`` of them) is
  judged: past ``critical_threshold_ms`` -> critical decrease; past ``slow_threshold_ms`` or past
  ``latency_tolerance`` x the no-load baseline (the server is queueing) -> decrease; at or under
  ``target_response_time_ms`` and the limit was actually used -> grow by
  ``rate_increase_factor`` (at least one slot); otherwise hold.

Single event loop: the limiter is not thread-safe and needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Literal

from imgpipe_dagster.resilience.settings import LimiterSettings

logger = logging.getLogger("imgpipe.resilience")

LossKind = Literal["429", "timeout", "error"]
LOSS_KINDS: tuple[str, ...] = ("429", "timeout", "error")


class QueueFull(RuntimeError):
    """More callers are waiting for a slot than resilience_max_queue allows (back-pressure, not a URL failure)."""


class QueueTimeout(TimeoutError):
    """A caller waited longer than queue_timeout for a slot (back-pressure, not a URL failure)."""


class AdaptiveLimiter:
    """Bounds requests in flight to one server by an adaptive limit; see the module docstring."""

    def __init__(
        self,
        name: str,
        settings: LimiterSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._sleep = sleep
        self._limit = self.settings.initial_limit
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[float]] = deque()
        self._next_start_at = -math.inf
        self._start_spacing_s = 1.0 / self.settings.resilience_max_rate
        now = clock()
        # Control window: latencies completed since the last adjustment.
        self._window: deque[float] = deque(maxlen=max(1, self.settings.rate_window_size))
        self._completions_since_adjust = 0
        self._window_means: deque[float] = deque(maxlen=max(1, self.settings.baseline_windows))
        self._last_adjust_at = now
        self._last_decrease_at = -math.inf
        self._peak_in_flight = 0
        self._queued_since_adjust = False
        self._capacity_listeners: list[Callable[[], None]] = []
        self._last_adjustment: dict[str, object] | None = None
        self._last_interval_rate = 0.0
        self._recent_latencies: deque[float] = deque(maxlen=max(1, self.settings.rate_window_size))
        self.counters: dict[str, int] = {
            "started": 0,
            "successes": 0,
            "losses_429": 0,
            "losses_timeout": 0,
            "losses_error": 0,
            "losses_absorbed": 0,
            "queue_full": 0,
            "queue_timeouts": 0,
            "increases": 0,
            "decreases": 0,
        }

    # ----------------------------------------------------------------- state

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def effective_limit(self) -> int:
        """The integer number of requests allowed in flight right now."""
        return max(1, int(self._limit + 1e-9))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def free(self) -> int:
        """Slots a new request could take without waiting (negative after a decrease)."""
        return self.effective_limit - self._in_flight

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a slot frees or the limit grows (the router waits on this)."""
        self._capacity_listeners.append(listener)

    # ------------------------------------------------------------- admission

    def try_acquire_nowait(self) -> float | None:
        """Take a slot if one is free and nobody is queued; returns the pacing delay to sleep, or None."""
        if self._waiters or self._in_flight >= self.effective_limit:
            return None
        return self._take_slot()

    async def acquire(self) -> None:
        """Wait for a slot (FIFO); raises QueueFull or QueueTimeout instead of piling up work."""
        delay = self.try_acquire_nowait()
        if delay is None:
            delay = await self._wait_in_queue()
        if delay > 0:
            try:
                await self._sleep(delay)
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        """Give a slot back. Pair every successful acquire with exactly one release."""
        if self._in_flight <= 0:
            raise RuntimeError(f"limiter {self.name}: release without acquire")
        self._in_flight -= 1
        self._dispatch()
        self._notify_capacity()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[LimiterSlot]:
        """``async with limiter.slot() as s: ... s.success()`` acquires, yields, and always releases."""
        await self.acquire()
        held = LimiterSlot(self)
        try:
            yield held
        finally:
            self.release()

    def _take_slot(self) -> float:
        self._in_flight += 1
        self.counters["started"] += 1
        self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        now = self._clock()
        start_at = max(now, self._next_start_at)
        self._next_start_at = start_at + self._start_spacing_s
        return start_at - now

    async def _wait_in_queue(self) -> float:
        if self.queued >= self.settings.resilience_max_queue:
            self.counters["queue_full"] += 1
            raise QueueFull(
                f"limiter {self.name}: {self.queued} callers already waiting "
                f"(resilience_max_queue={self.settings.resilience_max_queue})"
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[float] = loop.create_future()
        self._waiters.append(waiter)
        self._queued_since_adjust = True
        timeout = self.settings.queue_timeout

        def expire() -> None:
            if not waiter.done():
                self.counters["queue_timeouts"] += 1
                waiter.set_exception(
                    QueueTimeout(f"limiter {self.name}: no slot within queue_timeout={timeout:g}s")
                )

        timer = loop.call_later(timeout, expire)
        try:
            return await waiter
        except asyncio.CancelledError:
            # The slot may have been granted in the same loop step as the cancellation.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()
            raise
        finally:
            timer.cancel()
            self._discard_done_waiters()

    def _discard_done_waiters(self) -> None:
        self._waiters = deque(waiter for waiter in self._waiters if not waiter.done())

    def _dispatch(self) -> None:
        while self._waiters and self._in_flight < self.effective_limit:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            waiter.set_result(self._take_slot())

    def _notify_capacity(self) -> None:
        for listener in self._capacity_listeners:
            listener()

    # --------------------------------------------------------------- signals

    def record_success(self, latency_s: float) -> None:
        """A request completed with an answer from the server (any answer other than a loss)."""
        self.counters["successes"] += 1
        self._window.append(latency_s)
        self._recent_latencies.append(latency_s)
        self._completions_since_adjust += 1
        self._maybe_adjust()

    def record_loss(self, kind: LossKind, latency_s: float) -> None:
        """A request was lost to overload: a 429, a timeout, or a server error. Decreases at once."""
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
        self.counters[f"losses_{kind}"] += 1
        now = self._clock()
        started_at = now - latency_s
        if started_at < self._last_decrease_at:
            # This request was sent under the previous, larger limit: its loss is already accounted for.
            self.counters["losses_absorbed"] += 1
            return
        critical = latency_s * 1000.0 >= self.settings.critical_threshold_ms
        factor = self.settings.rate_critical_decrease_factor if critical else self.settings.rate_decrease_factor
        reason = f"loss {kind}" + (f", {latency_s:.1f}s past critical" if critical else "")
        self._decrease(factor, reason, now)

    # ---------------------------------------------------------------- control

    def _maybe_adjust(self) -> None:
        now = self._clock()
        if now - self._last_adjust_at < self.settings.rate_adjustment_interval:
            return
        if len(self._window) < self.settings.rate_min_samples:
            return
        samples = list(self._window)
        mean_s = statistics.fmean(samples)
        p50_s = statistics.median(samples)
        self._window_means.append(mean_s)
        baseline_s = min(self._window_means)
        in_use = self._queued_since_adjust or self._peak_in_flight >= self.effective_limit
        elapsed = now - self._last_adjust_at
        self._last_interval_rate = self._completions_since_adjust / elapsed if elapsed > 0 else 0.0
        facts = f"mean {mean_s:.2f}s p50 {p50_s:.2f}s over {len(samples)} calls"
        s = self.settings
        if mean_s * 1000.0 >= s.critical_threshold_ms:
            self._decrease(s.rate_critical_decrease_factor, f"critical latency, {facts}", now)
        elif mean_s * 1000.0 > s.slow_threshold_ms:
            self._decrease(s.rate_decrease_factor, f"slow, {facts}", now)
        elif mean_s > s.latency_tolerance * baseline_s:
            self._decrease(s.rate_decrease_factor, f"queueing, {facts}, baseline {baseline_s:.2f}s", now)
        elif mean_s * 1000.0 <= s.target_response_time_ms and in_use:
            self._increase(f"in use, {facts}", now)
        else:
            why = "not in use" if not in_use else "above target"
            logger.debug("Rate limit %s held at %d (%s, %s)", self.name, self.effective_limit, why, facts)
        self._window.clear()
        self._completions_since_adjust = 0
        self._last_adjust_at = now
        self._peak_in_flight = self._in_flight
        self._queued_since_adjust = bool(self.queued)

    def _increase(self, reason: str, now: float) -> None:
        before = self._limit
        grown = max(before * self.settings.rate_increase_factor, before + 1.0)
        self._set_limit(min(grown, self.settings.max_limit), reason, now, "increase")
        self._dispatch()
        self._notify_capacity()

    def _decrease(self, factor: float, reason: str, now: float) -> None:
        self._last_decrease_at = now
        self._set_limit(max(self._limit * factor, self.settings.min_limit), reason, now, "decrease")

    def _set_limit(self, new_limit: float, reason: str, now: float, direction: str) -> None:
        before_effective = self.effective_limit
        before = self._limit
        self._limit = new_limit
        if new_limit != before:
            self.counters["increases" if direction == "increase" else "decreases"] += 1
        self._last_adjustment = {
            "at": now,
            "direction": direction,
            "from": round(before, 3),
            "to": round(new_limit, 3),
            "reason": reason,
        }
        if self.effective_limit != before_effective:
            logger.info("Rate limit %s %d -> %d (%s)", self.name, before_effective, self.effective_limit, reason)
        else:
            logger.debug("Rate limit %s %.2f -> %.2f (%s)", self.name, before, new_limit, reason)

    # ---------------------------------------------------------------- report

    def snapshot(self) -> dict[str, object]:
        """Plain-data view for logs, metrics and sensors."""
        recent = list(self._recent_latencies)
        return {
            "name": self.name,
            "limit": self.effective_limit,
            "limit_exact": round(self._limit, 3),
            "min_limit": round(self.settings.min_limit, 3),
            "max_limit": self.settings.max_limit,
            "in_flight": self._in_flight,
            "queued": self.queued,
            "rate": round(self._last_interval_rate, 3),
            "max_rate": self.settings.resilience_max_rate,
            "latency_p50_s": round(statistics.median(recent), 4) if recent else None,
            "baseline_s": round(min(self._window_means), 4) if self._window_means else None,
            "last_adjustment": dict(self._last_adjustment) if self._last_adjustment else None,
            "counters": dict(self.counters),
        }


class LimiterSlot:
    """One held slot; report the outcome once with success() or loss()."""

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self._limiter = limiter
        self._started_at = limiter._clock()
        self.reported = False

    def elapsed(self) -> float:
        return self._limiter._clock() - self._started_at

    def success(self, latency_s: float | None = None) -> None:
        self._report()
        self._limiter.record_success(self.elapsed() if latency_s is None else latency_s)

    def loss(self, kind: LossKind, latency_s: float | None = None) -> None:
        self._report()
        self._limiter.record_loss(kind, self.elapsed() if latency_s is None else latency_s)

    def _report(self) -> None:
        if self.reported:
            raise RuntimeError("outcome already reported for this slot")
        self.reported = True
