"""AdaptiveLimiter: admission, queue bounds, pacing, and every adjustment, driven by a fake clock."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from imgpipe_dagster.resilience import AdaptiveLimiter, LimiterSettings, QueueFull, QueueTimeout
from imgpipe_dagster_tests.resilience.fakes import FakeClock
from imgpipe_dagster_tests.resilience.medium import medium_limiter

# Times in seconds. MEDIUM: limits 4.8 / 8 / 24, target 5 s, slow 45 s, critical 90 s, interval 10 s.


def make(settings: LimiterSettings | None = None, **overrides) -> tuple[AdaptiveLimiter, FakeClock]:
    clock = FakeClock()
    limiter = AdaptiveLimiter("gpu0", replace(settings or medium_limiter(), **overrides), clock=clock, sleep=clock.sleep)
    return limiter, clock


def fill(limiter: AdaptiveLimiter) -> int:
    """Take every free slot; returns how many were taken."""
    taken = 0
    while limiter.try_acquire_nowait() is not None:
        taken += 1
    return taken


def complete_window(limiter: AdaptiveLimiter, clock: FakeClock, latency_s: float, calls: int = 10) -> None:
    """Let one adjustment interval pass with ``calls`` completions of ``latency_s``."""
    step = limiter.settings.rate_adjustment_interval / calls
    for _ in range(calls):
        clock.advance(step)
        limiter.record_success(latency_s)


def test_starts_at_the_initial_limit_and_admits_that_many():
    limiter, _ = make()
    assert limiter.effective_limit == 8
    assert fill(limiter) == 8
    assert limiter.in_flight == 8
    assert limiter.try_acquire_nowait() is None


def test_waiters_are_served_in_order_when_slots_free():
    async def scenario():
        limiter, _ = make(medium_limiter(resilience_max_rate=1e6))
        fill(limiter)
        order: list[int] = []

        async def caller(index: int) -> None:
            await limiter.acquire()
            order.append(index)

        tasks = [asyncio.create_task(caller(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert limiter.queued == 3
        for _ in range(3):
            limiter.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]
        assert limiter.queued == 0

    asyncio.run(scenario())


def test_a_full_queue_rejects_clearly():
    async def scenario():
        limiter, _ = make(medium_limiter(resilience_max_queue=2))
        fill(limiter)
        waiting = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="resilience_max_queue=2"):
            await limiter.acquire()
        assert limiter.counters["queue_full"] == 1
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(scenario())


def test_a_caller_waiting_past_queue_timeout_gets_queue_timeout():
    async def scenario():
        limiter, _ = make(medium_limiter(queue_timeout=0.01))
        fill(limiter)
        with pytest.raises(QueueTimeout, match="queue_timeout"):
            await limiter.acquire()
        assert limiter.queued == 0
        assert limiter.counters["queue_timeouts"] == 1

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_no_slot_behind():
    async def scenario():
        limiter, _ = make(medium_limiter())
        taken = fill(limiter)
        waiter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert limiter.in_flight == taken
        limiter.release()
        assert limiter.in_flight == taken - 1

    asyncio.run(scenario())


def test_max_rate_is_a_ceiling_on_starts_per_second():
    async def scenario():
        clock = FakeClock()
        limiter = AdaptiveLimiter("gpu0", medium_limiter(resilience_max_rate=10.0), clock=clock, sleep=clock.sleep)
        for _ in range(3):
            await limiter.acquire()
        assert clock.slept == pytest.approx([0.1, 0.1])  # starts at t, t+0.1, t+0.2

    asyncio.run(scenario())


def test_slot_context_releases_and_measures_latency():
    async def scenario():
        limiter, clock = make()
        async with limiter.slot() as slot:
            clock.advance(2.5)
            slot.success()
        assert limiter.in_flight == 0
        assert limiter.snapshot()["latency_p50_s"] == 2.5

    asyncio.run(scenario())


# ------------------------------------------------------------------ growth


def test_grows_when_the_limit_is_in_use_and_latency_is_healthy(caplog):
    limiter, clock = make(medium_limiter())
    fill(limiter)
    with caplog.at_level(logging.INFO, logger="imgpipe.resilience"):
        complete_window(limiter, clock, latency_s=1.0)
    assert limiter.limit == pytest.approx(9.0)  # max(8 x 1.08, 8 + 1)
    assert "Rate limit gpu0 8 -> 9 (in use, mean 1.00s p50 1.00s over 10 calls)" in caplog.text


def test_growth_is_multiplicative_once_that_beats_one_slot():
    limiter, clock = make(medium_limiter(resilience_initial_rate=20.0))  # limit 16
    fill(limiter)
    complete_window(limiter, clock, latency_s=1.0)
    assert limiter.limit == pytest.approx(16 * 1.08)


def test_does_not_grow_when_the_limit_is_not_in_use():
    limiter, clock = make(medium_limiter())
    for _ in range(limiter.effective_limit - 1):
        limiter.try_acquire_nowait()
    complete_window(limiter, clock, latency_s=1.0)
    assert limiter.limit == pytest.approx(8.0)


def test_does_not_grow_above_target_latency():
    limiter, clock = make(medium_limiter())
    fill(limiter)
    complete_window(limiter, clock, latency_s=6.0)  # target 5 s, slow 45 s: hold
    assert limiter.limit == pytest.approx(8.0)


def test_no_adjustment_before_the_interval_or_with_too_few_samples():
    limiter, clock = make(medium_limiter())
    fill(limiter)
    clock.advance(9.9)
    for _ in range(20):
        limiter.record_success(1.0)
    assert limiter.limit == pytest.approx(8.0)
    clock.advance(0.2)
    limiter.record_success(1.0)  # now past the interval with 21 samples
    assert limiter.limit == pytest.approx(9.0)
    fill(limiter)
    clock.advance(10)
    for _ in range(4):  # rate_min_samples is 5
        limiter.record_success(1.0)
    assert limiter.limit == pytest.approx(9.0)


def test_never_grows_past_the_ceiling():
    limiter, clock = make(medium_limiter())
    for _ in range(40):
        fill(limiter)
        complete_window(limiter, clock, latency_s=1.0)
    assert limiter.limit == 24.0


# --------------------------------------------------------------- decreases


def test_a_429_decreases_at_once_by_the_decrease_factor(caplog):
    limiter, _ = make(medium_limiter(resilience_initial_rate=20.0))
    with caplog.at_level(logging.INFO, logger="imgpipe.resilience"):
        limiter.record_loss("429", latency_s=0.05)
    assert limiter.limit == pytest.approx(16 * 0.92)
    assert "Rate limit gpu0 16 -> 14 (loss 429)" in caplog.text


def test_a_loss_past_the_critical_threshold_uses_the_critical_factor():
    limiter, _ = make(medium_limiter(resilience_initial_rate=20.0))
    limiter.record_loss("timeout", latency_s=120.0)  # REQUEST_TIMEOUT 120 s > critical 90 s
    assert limiter.limit == pytest.approx(16 * 0.7)


def test_losses_from_requests_sent_before_the_last_decrease_do_not_decrease_again():
    limiter, clock = make(medium_limiter(resilience_initial_rate=20.0))
    clock.advance(5)
    limiter.record_loss("429", latency_s=1.0)
    limiter.record_loss("429", latency_s=1.0)  # started 1 s ago, before the decrease that just happened
    assert limiter.limit == pytest.approx(16 * 0.92)
    assert limiter.counters["losses_absorbed"] == 1
    clock.advance(2)
    limiter.record_loss("429", latency_s=1.0)  # started after the decrease: a new episode
    assert limiter.limit == pytest.approx(16 * 0.92 * 0.92)


def test_a_loss_is_never_a_latency_sample():
    limiter, clock = make(medium_limiter())
    fill(limiter)
    clock.advance(10)
    for _ in range(10):
        limiter.record_loss("429", latency_s=0.001)
    assert limiter.snapshot()["latency_p50_s"] is None
    assert limiter.limit < 8.0


def test_a_slow_window_decreases_and_a_critical_window_decreases_harder():
    limiter, clock = make(medium_limiter(resilience_initial_rate=20.0))
    complete_window(limiter, clock, latency_s=50.0)  # slow 45 s
    assert limiter.limit == pytest.approx(16 * 0.92)
    before = limiter.limit
    complete_window(limiter, clock, latency_s=95.0)  # critical 90 s
    assert limiter.limit == pytest.approx(before * 0.7)


def test_latency_above_the_baseline_tolerance_means_queueing_and_decreases():
    limiter, clock = make(medium_limiter(resilience_initial_rate=20.0))
    complete_window(limiter, clock, latency_s=1.0)  # baseline 1 s, not in use: hold
    assert limiter.limit == pytest.approx(16.0)
    complete_window(limiter, clock, latency_s=1.5)  # 1.5 > 1.3 x 1.0, though under target 5 s
    assert limiter.limit == pytest.approx(16 * 0.92)
    assert "queueing" in limiter.snapshot()["last_adjustment"]["reason"]


def test_never_falls_below_the_floor():
    limiter, _ = make(medium_limiter())
    for step in range(50):
        limiter.record_loss("timeout", latency_s=120.0 - step * 1e-6)
        limiter._last_decrease_at = float("-inf")  # treat each loss as a new episode
    assert limiter.limit == pytest.approx(medium_limiter().min_limit)
    assert limiter.effective_limit == 4


def test_a_decrease_below_in_flight_admits_nobody_until_enough_complete():
    limiter, _ = make(medium_limiter())
    fill(limiter)  # 8 in flight
    limiter.record_loss("429", latency_s=0.0)  # limit 7.36 -> 7
    assert limiter.free == -1
    limiter.release()
    assert limiter.try_acquire_nowait() is None
    limiter.release()
    assert limiter.try_acquire_nowait() is not None


def test_snapshot_has_what_sensors_read():
    limiter, clock = make(medium_limiter())
    fill(limiter)
    complete_window(limiter, clock, latency_s=1.0)
    snap = limiter.snapshot()
    assert {"limit", "in_flight", "queued", "rate", "last_adjustment", "counters"} <= snap.keys()
    assert snap["limit"] == 9 and snap["in_flight"] == 8 and snap["queued"] == 0
    assert snap["rate"] == pytest.approx(1.0)  # 10 completions over 10 s
    assert snap["last_adjustment"]["direction"] == "increase"
    assert snap["counters"]["successes"] == 10


def test_unknown_loss_kinds_are_refused():
    limiter, _ = make()
    with pytest.raises(ValueError):
        limiter.record_loss("404", latency_s=1.0)  # type: ignore[arg-type]
