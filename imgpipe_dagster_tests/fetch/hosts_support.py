"""Helpers of the host-level fetch tests: fetch until nothing is deferred, with a deadline."""

from __future__ import annotations

import asyncio
import time

from imgpipe_dagster.fetch import ErrorClass, FetchResult, ImageFetcher


async def fetch_all(fetcher: ImageFetcher, items: list[tuple[object, str]]) -> list[FetchResult]:
    return [result async for result in fetcher.stream(items)]


async def fetch_until_settled(
    fetcher: ImageFetcher, items: list[tuple[object, str]], *, deadline_s: float, resubmit=lambda r: False
) -> tuple[dict[object, FetchResult], int]:
    """Fetch ``items``; URLs that come back HOST_DEFERRED (or for which ``resubmit`` is true) go again
    once their retry_after has passed, as the engine does, until none is left. Returns the last result
    per key and the number of passes."""
    final: dict[object, FetchResult] = {}
    pending = list(items)
    passes = 0
    give_up = time.monotonic() + deadline_s
    while pending:
        assert time.monotonic() < give_up, f"still deferred after {deadline_s}s: {len(pending)} URLs"
        passes += 1
        results = await fetch_all(fetcher, pending)
        by_key = {result.key: result for result in results}
        final.update(by_key)
        again = [r for r in results if r.error is not None and (deferred(r) or resubmit(r))]
        again_keys = {r.key for r in again}
        pending = [(key, url) for key, url in pending if key in again_keys]
        if pending:
            await asyncio.sleep(max((r.error.retry_after or 0.0) for r in again) + 0.05)
    return final, passes


def deferred(result: FetchResult) -> bool:
    return result.error is not None and result.error.error_class is ErrorClass.HOST_DEFERRED


def classes(results) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        kind = "ok" if result.ok else result.error.error_class.value
        counts[kind] = counts.get(kind, 0) + 1
    return counts
