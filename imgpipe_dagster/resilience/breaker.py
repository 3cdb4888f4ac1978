"""Circuit breaker on a weighted failure rate over a count-based window, with bounded half-open probes.

Why our own: ``pybreaker`` holds its lock across the guarded call (``with self._lock: return
self.state.call(...)``), so concurrent calls through one breaker run one at a time, and it opens
on a failure *count*, not a rate; ``aiobreaker`` is its asyncio fork with the same counting model;
``circuitbreaker`` counts consecutive failures and has no window, no slow-call rule and no bound
on half-open probes. The reliability rules want a failure rate over a window with a minimum
number of calls, weighted timeouts, slow calls counted, and a bounded number of probes.

The API never holds anything across the call: ``try_acquire()`` answers at once with a
``Permit`` or ``None``; the caller makes the call and reports ``permit.success(latency)`` or
``permit.failure(kind)``. A threading lock guards only the bookkeeping, so the breaker may be
shared by threads (image downloads) as well as coroutines.

States:

* closed: every call is admitted; each outcome enters a window of the last ``window_size``
  calls. Once the window holds at least ``minimum_calls`` calls and the weighted failure rate
  (sum of failure weights / sum of call weights) reaches ``circuit_failure_rate_threshold``,
  the breaker opens. A timeout weighs ``timeout_failure_weight``; an error, or a success slower
  than ``slow_call_threshold_ms``, weighs 1; a 429 is not counted at all (the server is alive,
  the limiter handles overload).
* open: nothing is admitted for ``circuit_timeout_seconds``; then half-open.
* half-open: at most ``half_open_probes`` probes in flight; ``circuit_success_threshold``
  probe successes close it (with an empty window); any probe failure opens it again.

Legacy count -> window: with the defaults the window is ``circuit_failure_threshold /
circuit_failure_rate_threshold`` calls (150 for MEDIUM's 75 at 0.5) and the minimum is
``circuit_failure_threshold`` calls, so a full window opens on exactly the legacy number of
(weighted) failures, but only when they are at least half of the recent traffic; a server
that fails everything opens after ``circuit_failure_threshold`` calls, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from imgpipe_dagster.resilience.settings import BreakerSettings

logger = logging.getLogger("imgpipe.resilience")


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


FAILURE_KINDS = ("timeout", "error", "429")


@dataclass
class Permit:
    """Admission for one call. Report exactly one of success(), failure() or cancel()."""

    breaker: CircuitBreaker
    generation: int
    probe: bool
    done: bool = False

    def success(self, latency_s: float) -> None:
        self.breaker.record_success(latency_s, permit=self)

    def failure(self, kind: str = "error") -> None:
        self.breaker.record_failure(kind, permit=self)

    def cancel(self) -> None:
        """The call never reached the server (or its outcome says nothing about it): free the permit."""
        self.breaker.record_cancel(self)


class CircuitBreaker:
    """Closed / open / half-open breaker for one server or host; see the module docstring."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        # Generation changes on every state change, so late outcomes of older calls are ignored.
        self._generation = 0
        # (call weight, failure weight) per call, newest last.
        self._window: deque[tuple[float, float]] = deque(maxlen=self.settings.window_size)
        self._opened_at = 0.0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._changed_at = clock()
        self.counters: dict[str, int] = {
            "admitted": 0,
            "rejected": 0,
            "successes": 0,
            "slow_calls": 0,
            "failures_error": 0,
            "failures_timeout": 0,
            "ignored_429": 0,
            "stale_outcomes": 0,
            "opened": 0,
            "half_opened": 0,
            "closed": 0,
        }

    # ----------------------------------------------------------------- state

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._advance_clock_locked()
            return self._state

    def seconds_until_half_open(self) -> float:
        """0 unless open; then how long until probes are admitted."""
        with self._lock:
            self._advance_clock_locked()
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.settings.circuit_timeout_seconds - self._clock())

    def failure_rate(self) -> float:
        with self._lock:
            return self._failure_rate_locked()

    # ------------------------------------------------------------- admission

    def try_acquire(self) -> Permit | None:
        """A permit if a call may go now, else None. Never blocks."""
        with self._lock:
            self._advance_clock_locked()
            if self._state is BreakerState.CLOSED:
                self.counters["admitted"] += 1
                return Permit(self, self._generation, probe=False)
            if self._state is BreakerState.HALF_OPEN and self._probes_in_flight < self.settings.half_open_probes:
                self._probes_in_flight += 1
                self.counters["admitted"] += 1
                return Permit(self, self._generation, probe=True)
            self.counters["rejected"] += 1
            return None

    def available(self) -> bool:
        """Whether try_acquire would admit a call now (without taking a permit)."""
        with self._lock:
            self._advance_clock_locked()
            if self._state is BreakerState.CLOSED:
                return True
            return self._state is BreakerState.HALF_OPEN and self._probes_in_flight < self.settings.half_open_probes

    # --------------------------------------------------------------- signals

    def record_success(self, latency_s: float, permit: Permit | None = None) -> None:
        """The server answered. Slower than slow_call_threshold_ms counts as a failure of weight 1."""
        slow = latency_s * 1000.0 > self.settings.slow_call_threshold_ms
        with self._lock:
            if not self._settle_locked(permit):
                return
            if slow:
                self.counters["slow_calls"] += 1
                self._on_failure_locked(1.0, 1.0, permit, f"slow call {latency_s:.1f}s")
            else:
                self.counters["successes"] += 1
                self._on_success_locked(permit)

    def record_failure(self, kind: str = "error", permit: Permit | None = None) -> None:
        """The call failed because of the server: kind "timeout" (weighted), "error", or "429" (ignored)."""
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected one of {FAILURE_KINDS}")
        with self._lock:
            if not self._settle_locked(permit):
                return
            if kind == "429":
                self.counters["ignored_429"] += 1
                return
            self.counters[f"failures_{kind}"] += 1
            weight = self.settings.timeout_failure_weight if kind == "timeout" else 1.0
            self._on_failure_locked(weight, weight, permit, kind)

    def record_cancel(self, permit: Permit) -> None:
        with self._lock:
            self._settle_locked(permit)

    # ----------------------------------------------------------------- inner

    def _settle_locked(self, permit: Permit | None) -> bool:
        """Free a probe slot; False when the outcome belongs to an older state and must be ignored."""
        if permit is None:
            return True
        if permit.done:
            raise RuntimeError("outcome already reported for this permit")
        permit.done = True
        if permit.generation != self._generation:
            self.counters["stale_outcomes"] += 1
            return False
        if permit.probe:
            self._probes_in_flight -= 1
        return True

    def _advance_clock_locked(self) -> None:
        if self._state is BreakerState.OPEN:
            waited = self._clock() - self._opened_at
            if waited >= self.settings.circuit_timeout_seconds:
                self._transition_locked(BreakerState.HALF_OPEN, f"after {waited:.0f}s open")

    def _failure_rate_locked(self) -> float:
        calls = sum(call for call, _ in self._window)
        failures = sum(failure for _, failure in self._window)
        return failures / calls if calls else 0.0

    def _on_success_locked(self, permit: Permit | None) -> None:
        if self._state is BreakerState.HALF_OPEN:
            if permit is not None and not permit.probe:
                return
            self._probe_successes += 1
            if self._probe_successes >= self.settings.circuit_success_threshold:
                self._transition_locked(BreakerState.CLOSED, f"{self._probe_successes} probe successes")
            return
        if self._state is BreakerState.CLOSED:
            self._window.append((1.0, 0.0))

    def _on_failure_locked(self, call_weight: float, failure_weight: float, permit: Permit | None, what: str) -> None:
        if self._state is BreakerState.HALF_OPEN:
            if permit is not None and not permit.probe:
                return
            self._transition_locked(BreakerState.OPEN, f"probe failed: {what}")
            return
        if self._state is not BreakerState.CLOSED:
            return
        self._window.append((call_weight, failure_weight))
        calls = len(self._window)
        if calls < self.settings.minimum_calls:
            return
        rate = self._failure_rate_locked()
        if rate >= self.settings.circuit_failure_rate_threshold:
            self._transition_locked(BreakerState.OPEN, f"failure rate {rate:.2f} over {calls} calls")

    def _transition_locked(self, new_state: BreakerState, reason: str) -> None:
        old_state = self._state
        self._state = new_state
        self._generation += 1
        self._changed_at = self._clock()
        self._probes_in_flight = 0
        self._probe_successes = 0
        if new_state is BreakerState.OPEN:
            self._opened_at = self._changed_at
            self.counters["opened"] += 1
        elif new_state is BreakerState.HALF_OPEN:
            self.counters["half_opened"] += 1
        else:
            self._window.clear()
            self.counters["closed"] += 1
        logger.info("Breaker %s %s -> %s (%s)", self.name, old_state.value, new_state.value, reason)

    # ---------------------------------------------------------------- report

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            self._advance_clock_locked()
            return {
                "name": self.name,
                "state": self._state.value,
                "since_s": round(self._clock() - self._changed_at, 3),
                "failure_rate": round(self._failure_rate_locked(), 4),
                "window_calls": len(self._window),
                "minimum_calls": self.settings.minimum_calls,
                "probes_in_flight": self._probes_in_flight,
                "probe_successes": self._probe_successes,
                "counters": dict(self.counters),
            }


class BreakerSet:
    """One breaker per key (e.g. image host), created on first use, least recently used dropped past max_keys."""

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or BreakerSettings.for_image_hosts()
        self.max_keys = max_keys
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> CircuitBreaker:
        with self._lock:
            breaker = self._breakers.pop(key, None)
            if breaker is None:
                breaker = CircuitBreaker(key, self.settings, clock=self._clock)
            self._breakers[key] = breaker  # re-insert: dict order is recency order
            while len(self._breakers) > self.max_keys:
                self._breakers.pop(next(iter(self._breakers)))
            return breaker

    def open_keys(self) -> list[str]:
        with self._lock:
            breakers = list(self._breakers.values())
        return [b.name for b in breakers if b.state is not BreakerState.CLOSED]

    def __len__(self) -> int:
        return len(self._breakers)
