"""Router: most free capacity first, open breakers skipped, and a visible wait when every server is out."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from imgpipe_dagster.resilience import BreakerState, QueueTimeout, Router
from imgpipe_dagster_tests.resilience.medium import medium_breaker, medium_limiter

URLS = ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
# Limit 8 per server, no per-run cap, no pacing worth mentioning.
LIMITS = medium_limiter(resilience_max_rate=1e4, resilience_initial_rate=8 / 24 * 1e4, max_concurrent_requests=0)
# Opens after 2 failures of 2 calls; probes after 0.2 s.
FRAGILE = medium_breaker(
    circuit_failure_threshold=2, circuit_minimum_calls=2, circuit_window_size=4,
    circuit_success_threshold=1, circuit_timeout_seconds=0.2,
)


def trip(router: Router, index: int) -> None:
    breaker = router.endpoints[index].breaker
    while breaker.state is BreakerState.CLOSED:
        breaker.try_acquire().failure("error")


def test_requests_go_to_the_server_with_the_most_free_capacity():
    async def scenario():
        router = Router(URLS, LIMITS, FRAGILE)
        assert [t.limiter.effective_limit for t in router.endpoints] == [8, 8]
        async with router.route() as first:
            async with router.route() as second:
                assert {first.name, second.name} == {"gpu0", "gpu1"}  # spread, not piled on one
                first.success(0.1)
                second.success(0.1)
        held = []
        for _ in range(3):
            context = router.route()
            held.append((context, await context.__aenter__()))
        names = [lease.name for _, lease in held]
        assert sorted(names) == ["gpu0", "gpu0", "gpu1"] or sorted(names) == ["gpu0", "gpu1", "gpu1"]
        for context, _ in held:
            await context.__aexit__(None, None, None)
        assert router.in_flight == 0

    asyncio.run(scenario())


def test_an_open_breaker_takes_its_server_out():
    async def scenario():
        router = Router(URLS, LIMITS, FRAGILE)
        trip(router, 0)
        for _ in range(5):
            async with router.route() as lease:
                assert lease.endpoint == URLS[1]
                lease.success(0.01)

    asyncio.run(scenario())


def test_when_every_server_is_out_work_waits_visibly_and_resumes(caplog):
    async def scenario():
        # probes after 1 s: long enough that a busy machine cannot let the waiter through before it is seen
        router = Router(URLS, LIMITS, dataclasses.replace(FRAGILE, circuit_timeout_seconds=1.0))
        trip(router, 0)
        trip(router, 1)
        got: list[str] = []

        async def work():
            async with router.route() as lease:
                got.append(lease.name)
                lease.success(0.01)

        with caplog.at_level(logging.INFO, logger="imgpipe.resilience"):
            task = asyncio.create_task(work())
            deadline = asyncio.get_running_loop().time() + 0.5
            while router.waiting == 0 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            assert router.waiting == 1 and router.all_out
            snap = router.snapshot()
            assert snap["all_out"] is True and snap["waiting"] == 1
            await task  # no exception: the breaker's timeout passes and a probe is admitted
        assert len(got) == 1
        assert "Router waiting: all 2 GPU servers out (gpu0 open 0s, gpu1 open 0s); 1 requests waiting" in caplog.text
        assert "Router resumed after" in caplog.text
        assert router.counters["all_out_episodes"] == 1

    asyncio.run(scenario())


def test_waiting_while_every_server_is_out_has_no_deadline():
    async def scenario():
        limits = medium_limiter(queue_timeout=0.01, max_concurrent_requests=0)
        breakers = medium_breaker(
            circuit_failure_threshold=2, circuit_minimum_calls=2, circuit_window_size=4,
            circuit_success_threshold=1, circuit_timeout_seconds=0.3,
        )
        router = Router(URLS, limits, breakers, wait_log_interval_s=0.05)
        trip(router, 0)
        trip(router, 1)
        async with router.route() as lease:  # waits 0.3 s, 30x the queue timeout, and still gets through
            assert [t.breaker.state for t in router.endpoints if t.name == lease.name] == [BreakerState.HALF_OPEN]
            lease.success(0.01)
        # it waited for a breaker to reopen (one all-out episode), and never counted as a queue timeout
        assert router.counters["all_out_episodes"] == 1
        assert router.counters["queue_timeouts"] == 0 and router.counters["routed"] == 1
        assert router.waiting == 0 and router.in_flight == 0

    asyncio.run(scenario())


def test_busy_servers_make_callers_wait_then_time_out_as_back_pressure():
    async def scenario():
        limits = medium_limiter(resilience_initial_rate=1.0, resilience_min_rate=1.0, queue_timeout=0.05, max_concurrent_requests=0)
        router = Router(URLS[:1], limits, FRAGILE)
        assert router.endpoints[0].limiter.effective_limit == 1
        async with router.route():
            with pytest.raises(QueueTimeout):
                async with router.route():
                    pass
        assert router.counters["queue_timeouts"] == 1 and router.waiting == 0

    asyncio.run(scenario())


def test_a_freed_slot_wakes_the_first_waiter():
    async def scenario():
        limits = medium_limiter(resilience_initial_rate=1.0, resilience_min_rate=1.0, max_concurrent_requests=0)
        router = Router(URLS[:1], limits, FRAGILE)
        order: list[int] = []

        async def work(index: int):
            async with router.route() as lease:
                order.append(index)
                await asyncio.sleep(0)
                lease.success(0.01)

        await asyncio.gather(*(work(i) for i in range(4)))
        assert order == [0, 1, 2, 3]

    asyncio.run(scenario())


def test_the_per_run_cap_bounds_requests_in_flight_across_servers():
    async def scenario():
        limits = medium_limiter(resilience_max_rate=1e4, resilience_initial_rate=1e4, max_concurrent_requests=3,
                                 queue_timeout=0.05)
        router = Router(URLS, limits, FRAGILE)
        contexts = [router.route() for _ in range(3)]
        for context in contexts:
            await context.__aenter__()
        with pytest.raises(QueueTimeout):
            async with router.route():
                pass
        for context in contexts:
            await context.__aexit__(None, None, None)

    asyncio.run(scenario())


def test_lease_outcomes_feed_the_limiter_and_the_breaker():
    async def scenario():
        router = Router(URLS[:1], LIMITS, FRAGILE)
        async with router.route() as lease:
            lease.loss("timeout", latency_s=1.0)
        snap = router.snapshot()["endpoints"][0]
        assert snap["limiter"]["counters"]["losses_timeout"] == 1
        assert snap["breaker"]["counters"]["failures_timeout"] == 1
        assert snap["limiter"]["limit"] == 7  # 8 x 0.92
        async with router.route():
            pass  # no outcome: the permit is cancelled and the slot released
        assert router.in_flight == 0

    asyncio.run(scenario())
