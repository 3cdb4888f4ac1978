"""Hosts have health: bad URLs let go early, dead hosts deferred then probed, 429 hosts paused,
DNS failures remembered per name. Every host is a real server on its own 127.x address."""

from __future__ import annotations

import asyncio

from imgpipe_dagster.fetch import ErrorClass, ImageFetcher
from imgpipe_dagster.settings_map import medium_fetch_settings
from imgpipe_dagster_tests.fetch.hosts_support import classes, deferred, fetch_all, fetch_until_settled
from imgpipe_dagster_tests.web.image_server import ImageServer, fault_test_settings, loopback_address


def test_a_hanging_and_a_trickling_host_are_cut_at_the_new_limits_with_their_classes() -> None:
    # the product defaults (3 s to first byte, 2 KiB/s after 2 s) under the 10 s total deadline
    settings = medium_fetch_settings(allowed_networks=["127.0.0.0/8"])
    assert settings.prefetch_download_timeout == 10.0
    with (
        ImageServer(loopback_address(10), behaviour="hang") as hanging,
        ImageServer(loopback_address(11), behaviour="trickle") as trickling,
    ):

        async def scenario():
            async with ImageFetcher(settings) as fetcher:
                return await fetch_all(
                    fetcher,
                    [("hang", hanging.image_url("rocket", "jpg")), ("trickle", trickling.image_url("rocket", "jpg"))],
                )

        results = {r.key: r for r in asyncio.run(scenario())}
    # robots.txt is the host's first request, so the hanging host hangs there
    assert results["hang"].error.error_class is ErrorClass.TTFB_TIMEOUT, results["hang"].error
    assert results["trickle"].error.error_class is ErrorClass.TOO_SLOW, results["trickle"].error
    assert "under 2048 B/s" in results["trickle"].error.message
    assert trickling.request_log[-1][1] == "/img/rocket.jpg"  # the body was being read when cut


def test_a_dead_hosts_urls_are_deferred_after_a_few_failures_and_finish_when_it_returns() -> None:
    settings = fault_test_settings(host_failures_to_open=3, host_probe_interval_s=0.3,
                                   host_probes_before_unreachable=100)  # fmt: skip
    with ImageServer(loopback_address(20)) as server:
        items = [(i, server.image_url("rocket", "jpg", width=64, n=i)) for i in range(20)]
        server.go_down()

        async def scenario():
            async with ImageFetcher(settings) as fetcher:
                first = await fetch_all(fetcher, items)
                server.come_back()
                settled, _passes = await fetch_until_settled(
                    fetcher, items, deadline_s=60, resubmit=lambda r: r.error.retryable
                )
                return first, settled

        first, settled = asyncio.run(scenario())
        log = [path for _t, path in server.request_log]
    # one request at a time to a host that has not answered: three refusals open the breaker
    assert classes(first) == {"connect_refused": 3, "host_deferred": 17}
    assert all(r.error.retry_after > 0 and r.http_status is None for r in first if deferred(r))
    assert all(r.ok for r in settled.values()), classes(settled.values())
    assert log.count("/robots.txt") == 1 and len(log) == 1 + len(items)


def test_a_trickling_hosts_urls_are_deferred_after_a_few_too_slow_bodies() -> None:
    # every body of this host trickles: counted per URL only, each of its URLs would hold a slot for
    # the grace period on every attempt; as a host failure three open its breaker
    settings = fault_test_settings(min_rate_grace_s=0.5, host_failures_to_open=3, per_host_limit=4)
    with ImageServer(loopback_address(12), behaviour="trickle") as server:
        items = [(i, server.image_url("rocket", "jpg", n=i)) for i in range(20)]

        async def scenario():
            async with ImageFetcher(settings) as fetcher:
                return await fetch_all(fetcher, items)

        results = asyncio.run(scenario())
        image_requests = [path for _t, path in server.request_log if path.startswith("/img/")]
    counts = classes(results)
    assert set(counts) == {"too_slow", "host_deferred"}, counts
    # at most the host's window was under way when the third body was cut
    assert 3 <= counts["too_slow"] <= 4 and len(image_requests) == counts["too_slow"]
    assert all(r.error.retry_after >= settings.host_probe_interval_s for r in results if deferred(r))


def test_a_dead_host_that_never_returns_costs_a_bounded_number_of_requests() -> None:
    settings = fault_test_settings(ttfb_timeout_s=1.0, host_failures_to_open=3, host_probe_interval_s=0.2,
                                   host_probes_before_unreachable=2)  # fmt: skip
    with ImageServer(loopback_address(30), behaviour="hang") as server:
        items = [(i, server.image_url("rocket", "jpg", n=i)) for i in range(300)]

        async def scenario():
            async with ImageFetcher(settings) as fetcher:
                return await fetch_until_settled(fetcher, items, deadline_s=60)

        settled, _passes = asyncio.run(scenario())
        requests = server.requests
    # three failures open the breaker, two failed probes make the host unreachable: five requests
    assert requests == 3 + 2
    assert classes(settled.values()) == {"ttfb_timeout": 5, "host_unreachable": 295}


def test_a_name_that_keeps_failing_dns_counts_like_a_dead_host() -> None:
    lookups = []

    async def failing_lookup(host: str):
        lookups.append(host)
        raise OSError("Name or service not known")

    # no DNS cache, so every attempt would look the name up again
    settings = fault_test_settings(dns_cache_ttl_s=0, host_probe_interval_s=0.1, host_probes_before_unreachable=2)
    items = [(i, f"http://gone.example/img/{i}.jpg") for i in range(100)]

    async def scenario():
        async with ImageFetcher(settings, lookup=failing_lookup) as fetcher:
            return await fetch_until_settled(fetcher, items, deadline_s=30)

    settled, _passes = asyncio.run(scenario())
    assert len(lookups) == 3 + 2
    assert classes(settled.values()) == {"dns_failure": 5, "host_unreachable": 95}


def test_a_host_answering_429_is_paused_for_its_retry_after() -> None:
    with ImageServer(loopback_address(40), behaviour="throttle", retry_after=1) as server:
        items = [(i, server.image_url("rocket", "jpg", n=i)) for i in range(6)]

        async def scenario():
            passes = []
            async with ImageFetcher(fault_test_settings()) as fetcher:
                for _ in range(3):
                    results = await fetch_all(fetcher, items)
                    passes.append(classes(results))
                    await asyncio.sleep(max(r.error.retry_after for r in results) + 0.05)
            return passes

        passes = asyncio.run(scenario())
        image_requests = [t for t, path in server.request_log if path.startswith("/img/")]
    # each pass: one request gets the 429, the host's other URLs wait without a request or an attempt
    assert passes == [{"http_429": 1, "host_deferred": 5}] * 3
    assert len(image_requests) == 3
    gaps = [later - earlier for earlier, later in zip(image_requests, image_requests[1:], strict=False)]
    assert all(gap >= 1.0 for gap in gaps), gaps  # never sooner than the host's Retry-After


def test_a_503_pauses_the_host_and_the_url_keeps_its_own_retryable_class() -> None:
    with ImageServer(loopback_address(41), behaviour="unavailable", retry_after=2) as server:
        items = [(i, server.image_url("rocket", "jpg", n=i)) for i in range(4)]

        async def scenario():
            async with ImageFetcher(fault_test_settings()) as fetcher:
                return await fetch_all(fetcher, items)

        results = asyncio.run(scenario())
    assert classes(results) == {"http_5xx": 1, "host_deferred": 3}
    [unavailable] = [r for r in results if not deferred(r)]
    assert unavailable.error.retry_after == 2.0 and unavailable.error.retryable
    assert all(0 < r.error.retry_after <= 2.0 and not r.error.error_class.spends_attempt
               for r in results if deferred(r))  # fmt: skip


def test_a_long_queue_at_a_host_that_keeps_answering_is_never_deferred() -> None:
    # one host, its rate the limit: the last URLs wait seconds behind it, far past host_queue_wait_s,
    # yet no other host needs the room, so deferring them would only idle the run (the demo's case)
    settings = fault_test_settings(per_host_limit=4, per_host_requests_per_s=10.0, host_queue_wait_s=0.5)
    with ImageServer(loopback_address(60)) as server:
        items = [(i, server.image_url("rocket", "jpg", width=64, n=i)) for i in range(30)]

        async def scenario():
            async with ImageFetcher(settings) as fetcher:
                return await fetch_all(fetcher, items)

        results = asyncio.run(scenario())
    assert all(r.ok for r in results), classes(results)


def test_one_hanging_host_does_not_hold_the_others_back() -> None:
    # sixteen slots, a look-ahead of 32, eight per host; the hanging host's first request waits 20 s.
    # Its URLs fill the look-ahead; once it has finished nothing for 5 s, the hanging host's URL in
    # hand is deferred, and so are the ones after it, letting the healthy host's URLs in
    settings = fault_test_settings(prefetch_concurrent_downloads=16, per_host_limit=8, ttfb_timeout_s=20.0,
                                   read_timeout_s=25.0, prefetch_download_timeout=30.0,
                                   host_queue_wait_s=5.0)  # fmt: skip
    with (
        ImageServer(loopback_address(50), behaviour="hang") as hanging,
        ImageServer(loopback_address(51)) as healthy,
    ):
        stuck = [(f"hang-{i}", hanging.image_url("rocket", "jpg", n=i)) for i in range(100)]
        good = [(f"good-{i}", healthy.image_url("rocket", "jpg", width=64, n=i)) for i in range(60)]

        async def scenario():
            # the input stays open, as the engine's does: deferred URLs come back after retry_after
            inbox: asyncio.Queue = asyncio.Queue()
            for item in stuck + good:
                inbox.put_nowait(item)

            async def items():
                while True:
                    yield await inbox.get()

            seen, ok = [], set()
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(60), ImageFetcher(settings) as fetcher:
                async for result in fetcher.stream(items()):
                    seen.append(result)
                    ok.update([result.key] if result.ok else [])
                    if deferred(result) and result.key.startswith("good"):
                        loop.call_later(result.error.retry_after, inbox.put_nowait, (result.key, result.url))
                    if len(ok) == len(good):
                        break  # the hanging host's first request is still waiting
            return seen

        seen = asyncio.run(scenario())
        hanging_requests = hanging.requests
    # the hanging host holds one slot and a short queue at its gate; the rest of its URLs are deferred
    # at once, so they neither fill the look-ahead nor take slots, and every healthy URL gets through
    assert {r.key for r in seen if r.ok} == {key for key, _url in good}
    assert {r.error.error_class for r in seen if not r.ok} == {ErrorClass.HOST_DEFERRED}
    assert hanging_requests == 1
