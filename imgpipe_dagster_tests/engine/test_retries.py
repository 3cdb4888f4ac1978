"""Retries off the critical path, on real runs: a real image host, a tiny-model GPU server on the CPU,
a real PostgreSQL. Order is read from the host's request log, never from timings."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

from imgpipe_dagster.engine.runner import ShardRunner
from imgpipe_dagster.engine.settings import EngineSettings
from imgpipe_dagster.engine.stats import RunSummary
from imgpipe_dagster.profiles import resolve
from imgpipe_dagster.settings_map import engine_settings, medium_fetch_settings
from imgpipe_dagster.store import work
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster_tests.engine.conftest import LoggedHost
from imgpipe_dagster_tests.support import seed_corpus

SHARD = "s000001"


def small_run(retry_delay: float, **run_overrides) -> EngineSettings:
    """Two downloads in flight at most and small requests, so a shard takes many claims."""
    worker, _ = resolve("medium", {
        "images_per_request": 4, "max_concurrent_batches": 2, "chunk_size": 4, "max_concurrent_chunks": 2,
        "prefetch_concurrent_downloads": 2, "prefetch_queue_size": 2, "retry_delay": retry_delay,
        "lease_seconds": 30, "image_resize_threads": 1,
    })  # fmt: skip
    fetch = medium_fetch_settings(allowed_networks=["127.0.0.0/8"], prefetch_concurrent_downloads=2, prefetch_queue_size=2,
                          image_resize_threads=1, target_pixels=56 * 56, patch_multiple=28,
                          max_in_flight_ceiling=2)  # fmt: skip
    settings = engine_settings(worker, fetch, prompt_name="caption_short_v1")
    return replace(settings, run=replace(settings.run, **run_overrides))


def run_shard(database_url: str, owner: str, settings: EngineSettings, endpoint: str) -> RunSummary:
    return ShardRunner(database_url, owner, [SHARD], settings, [endpoint], progress=lambda line, summary: None).run()


def test_retries_interleave_with_fresh_work(conn, database_url, gpu_endpoint, imgpipe_home):
    with LoggedHost(delay_s=0.02) as host:
        flaky = [f"/flaky/{n}.jpg" for n in range(3)]
        fresh = [f"/ok/{n}.jpg" for n in range(80)]
        # the flaky URLs come first in the shard: their first attempts are among the first fetched
        seed_corpus(conn, {SHARD: [host.url(p) for p in flaky + fresh]})

        summary = run_shard(database_url, "run-interleave", small_run(retry_delay=0.01), gpu_endpoint)

        requests = host.requests
    assert summary.final_count("done") == len(flaky) + len(fresh)
    last_fresh = max(requests.index(p) for p in fresh)
    for path in flaky:
        assert requests.count(path) == 2
        second = requests.index(path, requests.index(path) + 1)
        assert second < last_fresh, f"the retry of {path} waited for the first pass to end"
    assert verify(conn, [SHARD]).complete


def attempts(flaky_hosts: list[LoggedHost]) -> list[int]:
    return [sum(p.startswith("/flaky/") for p in host.requests) for host in flaky_hosts]


def test_a_run_leaves_retries_not_yet_due_to_a_later_run(conn, database_url, gpu_endpoint, imgpipe_home):
    # each flaky URL on a host of its own that asks for 4 s before a retry (a host pause holds only that
    # host); a run waits at most 1 s for retries when nothing else is left
    settings = small_run(retry_delay=0.01, retry_wait_s=1.0)
    with contextlib.ExitStack() as stack:
        flaky_hosts = [stack.enter_context(LoggedHost(retry_after=4)) for _ in range(3)]
        fresh_host = stack.enter_context(LoggedHost())
        flaky = [host.url(f"/flaky/{n}.jpg") for n, host in enumerate(flaky_hosts)]
        fresh = [fresh_host.url(f"/ok/{n}.jpg") for n in range(6)]
        seed_corpus(conn, {SHARD: flaky + fresh})

        first = run_shard(database_url, "run-first", settings, gpu_endpoint)

        assert attempts(flaky_hosts) == [1, 1, 1], "the first run idled until the retries were due"
        assert first.final_count("failed_retryable") == len(flaky)
        assert first.urls_waiting_for_retry == len(flaky) and first.waiting_for_retry["next_due_at"]
        report = verify(conn, [SHARD])
        assert report.ok and not report.complete

        deadline = time.monotonic() + 60
        while work.leftover(conn, [SHARD]).claimable < len(flaky):
            conn.rollback()  # now() is the transaction's start: each look needs a new one
            assert time.monotonic() < deadline, "the retries never came due"
            time.sleep(0.2)
        second = run_shard(database_url, "run-second", settings, gpu_endpoint)

        assert attempts(flaky_hosts) == [2, 2, 2]
    assert second.final_count("done") == len(flaky) + len(fresh)
    assert second.urls_waiting_for_retry == 0
    assert verify(conn, [SHARD]).complete
