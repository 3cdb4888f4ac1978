"""stream(): bounded concurrency, one result per item in completion order, no fault stalls the queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from imgpipe_dagster.fetch import ErrorClass, FetchResult, ImageFetcher
from imgpipe_dagster_tests.web.image_server import ImageServer, fault_test_settings

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


async def collect(fetcher: ImageFetcher, items) -> list[FetchResult]:
    return [result async for result in fetcher.stream(items)]


def test_every_item_yields_exactly_one_result_among_faults(warm_image_server: ImageServer) -> None:
    image_server = warm_image_server
    good = [(f"good-{i}", url) for i, url in enumerate(image_server.good_urls(40, max_megapixels=1.0))]
    image_server.prerender(url for _key, url in good)
    faults = [(f"fault-{case.kind}", case.url) for case in image_server.fault_cases()]
    items = good + faults
    settings = fault_test_settings()

    async def scenario() -> list[FetchResult]:
        async with ImageFetcher(settings) as fetcher:
            return await collect(fetcher, items)

    results = asyncio.run(scenario())
    assert sorted(r.key for r in results) == sorted(key for key, _url in items)
    by_key = {r.key: r for r in results}
    assert all(by_key[key].ok for key, _url in good)
    # the slow faults (30 s of silent headers, byte-by-byte bodies and headers, a black-holed connect)
    # end in their timeout classes: the fetcher cut them, none held its worker until the server gave up
    for case in image_server.fault_cases():
        assert by_key[f"fault-{case.kind}"].error.error_class is case.expected


def test_results_arrive_in_completion_order() -> None:
    with ImageServer() as server:
        slow = ("slow", server.image_url("rocket", "jpg", n="slow") + "&delay=1.5")
        fast = [(f"fast-{i}", server.image_url("rocket", "jpg", n=i)) for i in range(6)]

        async def scenario() -> list[FetchResult]:
            async with ImageFetcher(fault_test_settings(prefetch_concurrent_downloads=3)) as fetcher:
                # a new host gets one request at a time until it answers (slow start): meet it first
                await fetcher.fetch(server.image_url("rocket", "jpg", n="hello"))
                return await collect(fetcher, [slow, *fast])

        keys = [r.key for r in asyncio.run(scenario())]
    assert keys[-1] == "slow"
    assert sorted(keys[:-1]) == sorted(key for key, _ in fast)


def test_a_slow_consumer_bounds_how_far_downloads_run_ahead() -> None:
    workers, queue_size = 3, 2
    pulled = 0

    def items(server: ImageServer):
        nonlocal pulled
        for i in range(30):
            pulled += 1
            yield i, server.image_url("chelsea", "jpg", n=i)

    async def scenario(server: ImageServer) -> list[int]:
        ahead = []
        settings = fault_test_settings(prefetch_concurrent_downloads=workers, prefetch_queue_size=queue_size)
        async with ImageFetcher(settings) as fetcher:
            consumed = 0
            async for _result in fetcher.stream(items(server)):
                consumed += 1
                ahead.append(pulled - consumed)
                await asyncio.sleep(0.02)
        return ahead

    with ImageServer() as server:
        ahead = asyncio.run(scenario(server))
        assert server.max_in_flight <= workers
    assert len(ahead) == 30
    # taken from the input but not yet consumed: the look-ahead (two per slot) and the next one in hand,
    # the queue, and the one the consumer holds
    assert max(ahead) <= 2 * workers + 1 + queue_size + 1


def test_async_iterables_are_accepted(image_server: ImageServer) -> None:
    async def items() -> AsyncIterator[tuple[int, str]]:
        for i in range(10):
            await asyncio.sleep(0)
            yield i, image_server.image_url("rocket", "jpg", n=f"async-{i}")

    async def scenario() -> list[FetchResult]:
        async with ImageFetcher(fault_test_settings()) as fetcher:
            return await collect(fetcher, items())

    results = asyncio.run(scenario())
    assert sorted(r.key for r in results) == list(range(10))
    assert all(r.ok for r in results)


def test_a_failing_input_iterator_surfaces_its_error(image_server: ImageServer) -> None:
    def items():
        yield 1, image_server.image_url("rocket", "jpg")
        raise ValueError("corpus file is malformed")

    async def scenario() -> None:
        async with ImageFetcher(fault_test_settings()) as fetcher:
            await collect(fetcher, items())

    with pytest.raises(ValueError, match="malformed"):
        asyncio.run(scenario())


def test_stopping_early_cancels_the_workers(image_server: ImageServer) -> None:
    async def scenario() -> set[asyncio.Task]:
        items = [(i, image_server.image_url("rocket", "jpg", n=f"early-{i}")) for i in range(50)]
        async with ImageFetcher(fault_test_settings()) as fetcher:
            stream = fetcher.stream(items)
            async for _result in stream:
                break
            await stream.aclose()
        await asyncio.sleep(0)
        return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}

    assert asyncio.run(scenario()) == set()


def test_without_prefetch_downloads_run_one_at_a_time() -> None:
    with ImageServer() as server:
        items = [(i, server.image_url("rocket", "jpg", n=i) + "&delay=0.05") for i in range(5)]

        async def scenario() -> list[FetchResult]:
            async with ImageFetcher(fault_test_settings(enable_prefetch=False)) as fetcher:
                return await collect(fetcher, items)

        results = asyncio.run(scenario())
        assert server.max_in_flight == 1
    assert [r.key for r in results] == list(range(5))


def test_fetch_never_raises_for_a_bad_url() -> None:
    async def scenario() -> list[FetchResult]:
        async with ImageFetcher(fault_test_settings()) as fetcher:
            return await collect(fetcher, [(1, "http://[::1"), (2, "javascript:alert(1)"), (3, None)])

    results = asyncio.run(scenario())
    assert {r.key: r.error.error_class for r in results} == {
        1: ErrorClass.INVALID_URL,
        2: ErrorClass.INVALID_URL,
        3: ErrorClass.INVALID_URL,
    }
