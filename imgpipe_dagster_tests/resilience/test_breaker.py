"""CircuitBreaker: every transition, driven by a fake clock."""

from __future__ import annotations

import logging
import threading

import pytest

from imgpipe_dagster.resilience import BreakerSet, BreakerSettings, BreakerState, CircuitBreaker
from imgpipe_dagster_tests.resilience.fakes import FakeClock
from imgpipe_dagster_tests.resilience.medium import medium_breaker

# A small breaker: window 10 calls, opens at 50% once 6 calls are in, 2 probes, 2 successes close it.
SMALL = medium_breaker(
    circuit_failure_threshold=5,
    circuit_window_size=10,
    circuit_minimum_calls=6,
    circuit_success_threshold=2,
    circuit_timeout_seconds=45,
    slow_call_threshold_ms=60000,
    timeout_failure_weight=1.5,
)


def make(settings: BreakerSettings = SMALL) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker("gpu1", settings, clock=clock), clock


def call(breaker: CircuitBreaker, outcome: str, latency_s: float = 1.0) -> None:
    permit = breaker.try_acquire()
    assert permit is not None
    if outcome == "ok":
        permit.success(latency_s)
    else:
        permit.failure(outcome)


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(SMALL.minimum_calls):
        call(breaker, "error")
    assert breaker.state is BreakerState.OPEN


def test_fewer_calls_than_the_minimum_never_open_even_if_all_fail():
    breaker, _ = make()
    for _ in range(SMALL.minimum_calls - 1):
        call(breaker, "error")
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate() == 1.0


def test_opens_when_the_failure_rate_reaches_the_threshold_with_enough_calls(caplog):
    breaker, _ = make()
    with caplog.at_level(logging.INFO, logger="imgpipe.resilience"):
        for outcome in ["ok", "error", "ok", "error", "ok"]:
            call(breaker, outcome)
        assert breaker.state is BreakerState.CLOSED
        call(breaker, "error")  # 3 of 6 = 0.50
    assert breaker.state is BreakerState.OPEN
    assert "Breaker gpu1 closed -> open (failure rate 0.50 over 6 calls)" in caplog.text


def test_a_low_failure_rate_never_opens():
    breaker, _ = make()
    for _ in range(100):
        for outcome in ["ok", "ok", "error"]:
            call(breaker, outcome)
    assert breaker.state is BreakerState.CLOSED


def test_timeouts_weigh_more_than_errors():
    breaker, _ = make()
    for outcome in ["ok", "ok", "ok", "ok", "timeout", "timeout"]:
        call(breaker, outcome)
    # 2 x 1.5 / (4 + 2 x 1.5) = 0.43: still closed; one more timeout tips it: 4.5 / 8.5 = 0.53
    assert breaker.state is BreakerState.CLOSED
    call(breaker, "timeout")
    assert breaker.state is BreakerState.OPEN


def test_slow_successes_count_as_failures():
    breaker, _ = make()
    for _ in range(6):
        call(breaker, "ok", latency_s=61.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot()["counters"]["slow_calls"] == 6


def test_429_is_neither_success_nor_failure():
    breaker, _ = make()
    for _ in range(50):
        call(breaker, "429")
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["window_calls"] == 0


def test_the_window_forgets_old_calls():
    breaker, _ = make()
    for _ in range(4):
        call(breaker, "error")
    for _ in range(10):
        call(breaker, "ok")
    assert breaker.failure_rate() == 0.0


def test_open_rejects_until_the_timeout_then_half_opens(caplog):
    breaker, clock = make()
    trip(breaker)
    assert breaker.try_acquire() is None
    clock.advance(44.9)
    assert breaker.try_acquire() is None
    assert breaker.seconds_until_half_open() == pytest.approx(0.1)
    clock.advance(0.1)
    with caplog.at_level(logging.INFO, logger="imgpipe.resilience"):
        assert breaker.state is BreakerState.HALF_OPEN
    assert "Breaker gpu1 open -> half-open (after 45s open)" in caplog.text


def test_half_open_admits_only_the_configured_number_of_probes():
    breaker, clock = make()
    trip(breaker)
    clock.advance(45)
    probes = [breaker.try_acquire(), breaker.try_acquire()]
    assert all(p is not None and p.probe for p in probes)
    assert breaker.try_acquire() is None
    assert not breaker.available()
    probes[0].cancel()  # a cancelled probe gives its slot back
    assert breaker.try_acquire() is not None


def test_half_open_closes_after_the_success_threshold(caplog):
    breaker, clock = make()
    trip(breaker)
    clock.advance(45)
    first, second = breaker.try_acquire(), breaker.try_acquire()
    first.success(1.0)
    assert breaker.state is BreakerState.HALF_OPEN
    with caplog.at_level(logging.INFO, logger="imgpipe.resilience"):
        second.success(1.0)
    assert breaker.state is BreakerState.CLOSED
    assert "Breaker gpu1 half-open -> closed (2 probe successes)" in caplog.text
    assert breaker.snapshot()["window_calls"] == 0


def test_more_successes_than_probes_are_needed_when_probes_are_fewer():
    settings = medium_breaker(
        circuit_failure_threshold=5, circuit_window_size=10, circuit_minimum_calls=6,
        circuit_success_threshold=3, circuit_half_open_probes=1,
    )
    breaker, clock = make(settings)
    for _ in range(6):
        call(breaker, "error")
    clock.advance(settings.circuit_timeout_seconds)
    for expected in [BreakerState.HALF_OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]:
        permit = breaker.try_acquire()
        assert breaker.try_acquire() is None  # one probe at a time
        permit.success(1.0)
        assert breaker.state is expected


def test_a_failed_probe_reopens_and_restarts_the_timeout(caplog):
    breaker, clock = make()
    trip(breaker)
    clock.advance(45)
    probe = breaker.try_acquire()
    with caplog.at_level(logging.INFO, logger="imgpipe.resilience"):
        probe.failure("timeout")
    assert breaker.state is BreakerState.OPEN
    assert "Breaker gpu1 half-open -> open (probe failed: timeout)" in caplog.text
    clock.advance(44)
    assert breaker.state is BreakerState.OPEN
    clock.advance(1)
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_slow_probe_reopens():
    breaker, clock = make()
    trip(breaker)
    clock.advance(45)
    breaker.try_acquire().success(61.0)
    assert breaker.state is BreakerState.OPEN


def test_outcomes_of_calls_admitted_before_a_state_change_are_ignored():
    breaker, clock = make()
    early = breaker.try_acquire()
    trip(breaker)
    clock.advance(45)
    probe = breaker.try_acquire()
    early.failure("error")  # admitted while closed, reported while half-open: stale
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.snapshot()["counters"]["stale_outcomes"] == 1
    probe.success(1.0)
    assert breaker.snapshot()["probe_successes"] == 1


def test_a_permit_reports_once():
    breaker, _ = make()
    permit = breaker.try_acquire()
    permit.success(1.0)
    with pytest.raises(RuntimeError):
        permit.failure("error")


def test_no_lock_is_held_across_the_call():
    breaker, _ = make()
    inside = threading.Event()
    release = threading.Event()

    def slow_call():
        permit = breaker.try_acquire()
        inside.set()
        release.wait(5)
        permit.success(1.0)

    worker = threading.Thread(target=slow_call)
    worker.start()
    inside.wait(5)
    assert breaker.try_acquire() is not None  # a second caller is admitted while the first is in flight
    release.set()
    worker.join()


def test_legacy_medium_count_opens_a_dead_server_after_75_failures():
    breaker, _ = make(medium_breaker())
    for _ in range(74):
        call(breaker, "error")
    assert breaker.state is BreakerState.CLOSED
    call(breaker, "error")
    assert breaker.state is BreakerState.OPEN


def test_breaker_set_keeps_one_breaker_per_host_and_forgets_the_least_recent():
    clock = FakeClock()
    hosts = BreakerSet(max_keys=2, clock=clock)
    first = hosts.get("a.example")
    assert hosts.get("a.example") is first
    hosts.get("b.example")
    hosts.get("a.example")  # a is now the most recent
    hosts.get("c.example")
    assert len(hosts) == 2
    assert hosts.get("a.example") is first
    assert hosts.settings == BreakerSettings.for_image_hosts()
