"""Downloads in flight: hundreds at once on one event loop, adjustable at run time, bounded in bytes,
with slot time accounted by outcome. Concurrency is counted on the servers, not inferred from time."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from imgpipe_dagster.fetch import ImageFetcher
from imgpipe_dagster_tests.fetch.hosts_support import classes
from imgpipe_dagster_tests.web.image_server import Meter, fault_test_settings, web_hosts


def interleaved(hosts, per_host: int) -> list[tuple[str, str]]:
    """``per_host`` small-photo URLs on every host, taking turns between hosts as a shuffled corpus would."""
    return [
        (f"{index}-{n}", host.image_url("rocket", "jpg", width=64, n=n))
        for n in range(per_host)
        for index, host in enumerate(hosts)
    ]


def test_max_in_flight_can_shrink_while_streaming() -> None:
    meter = Meter()
    settings = fault_test_settings(prefetch_concurrent_downloads=40, per_host_limit=8)
    with web_hosts(10, first=150, latency_s=0.3, meter=meter) as hosts:
        items = interleaved(hosts, per_host=20)

        async def scenario():
            async with ImageFetcher(settings) as fetcher:
                results, after_shrink, peak = [], None, 0

                async def watch():
                    nonlocal peak
                    while True:
                        if after_shrink is not None:
                            peak = max(peak, fetcher.in_flight)
                        await asyncio.sleep(0)

                watcher = asyncio.create_task(watch())
                async for result in fetcher.stream(items):
                    results.append(result)
                    if len(results) == 40:
                        fetcher.max_in_flight = 3
                    if after_shrink is None and len(results) >= 40 and fetcher.in_flight <= 3:
                        meter.reset()
                        after_shrink = len(results)
                watcher.cancel()
                return results, after_shrink, peak

        results, after_shrink, peak = asyncio.run(scenario())
    assert classes(results) == {"ok": len(items)}
    assert meter.max_in_flight > 3 or after_shrink is not None
    assert after_shrink is not None and after_shrink < len(items) - 20
    assert peak <= 3
    # the servers agree, but for one request whose handler had sent its last byte and not yet returned
    # when the next request came in
    assert meter.max_in_flight <= 3 + 1


def test_bodies_in_flight_stay_within_the_byte_budget(warm_image_server) -> None:
    # gzip bodies reserve max_bytes each (their decoded size is unknown): two fit in the budget
    max_bytes = 1 << 20
    settings = fault_test_settings(max_bytes=max_bytes, body_bytes_in_flight=2 * max_bytes,
                                   prefetch_concurrent_downloads=8)  # fmt: skip
    items = [(i, warm_image_server.url(f"/fault/gzip-ok?n={i}")) for i in range(24)]

    async def scenario():
        peak = 0
        async with ImageFetcher(settings) as fetcher:

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, fetcher.bytes_reserved)
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            results = [result async for result in fetcher.stream(items)]
            watcher.cancel()
            return results, peak, fetcher.bytes_reserved

    results, peak, left = asyncio.run(scenario())
    assert classes(results) == {"ok": len(items)}
    assert max_bytes <= peak <= 2 * max_bytes
    assert left == 0


# The fetcher runs in a fresh process: the servers' hundreds of threads in the test process must not
# share its interpreter lock (the fetcher would see its own loop starved as connect timeouts), and its
# peak RSS is then the fetcher's alone.
WORKER = r"""
import asyncio, json, sys
from imgpipe_dagster.fetch import ImageFetcher
from imgpipe_dagster.settings_map import medium_fetch_settings

items, target, overrides = json.loads(sys.stdin.read())
settings = medium_fetch_settings(allowed_networks=["127.0.0.0/8"], **overrides)

async def main():
    outcome, observed = {}, 0
    async with ImageFetcher(settings) as fetcher:
        fetcher.max_in_flight = target  # raised at run time, as the engine does
        async for result in fetcher.stream(items):
            kind = result.error.error_class.value if result.error else "ok"
            outcome[kind] = outcome.get(kind, 0) + 1
            observed = max(observed, fetcher.in_flight)
        return outcome, observed, dict(fetcher.slot_seconds)

outcome, observed, slot_seconds = asyncio.run(main())
# VmHWM is this process's own peak; ru_maxrss would also count the test process's RSS at exec (Linux
# carries the old address space's high-water mark over), over 1 GiB late in a full suite
peak_mib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
print(json.dumps({"outcome": outcome, "observed": observed, "slot_seconds": slot_seconds, "peak_rss_mib": peak_mib}))
"""


def fetch_in_a_worker(items, target: int, **overrides) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", WORKER], input=json.dumps([items, target, overrides]), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_three_hundred_downloads_in_flight_hide_a_long_latency() -> None:
    target, meter = 320, Meter()
    # 2.5 s of latency: 320 in flight need 128 completions a second, within a loaded machine's reach
    with web_hosts(40, first=100, latency_s=2.5, meter=meter) as hosts:  # 40 hosts × 8 a host = 320
        items = interleaved(hosts, per_host=24)
        # the legacy pool size stays small: the pool must not cap downloads in flight below max_in_flight
        report = fetch_in_a_worker(items, target, connection_pool_size=10, per_host_requests_per_s=1000.0,
                                   ttfb_timeout_s=8.0)  # fmt: skip
    assert report["outcome"] == {"ok": len(items)}
    # counted on the servers: at least 300 photos were being answered at the same moment
    assert 300 <= meter.max_in_flight <= target
    assert meter.max_connections >= 300
    assert report["observed"] <= target
    slot_seconds = report["slot_seconds"]
    assert set(slot_seconds) == {"ok"} and slot_seconds["ok"] >= len(items) * 2.5  # each held ≥ its 2.5 s


def test_seven_hundred_in_flight_stay_under_a_gigabyte() -> None:
    target, meter = 720, Meter()
    # 2.5 s of latency: 720 in flight then need 290 completions a second, which a loaded 2-core machine
    # serves (at 1 s it would need 720 a second, and the count would measure the CPU, not the fetcher)
    with web_hosts(90, first=200, latency_s=2.5, meter=meter) as hosts:  # 90 hosts × 8 a host = 720
        items = interleaved(hosts, per_host=24)
        # the product's caps and limits (byte budget, pool, per-host limit); no request rate cap, and a
        # first-byte limit above the latency
        report = fetch_in_a_worker(items, target, per_host_requests_per_s=1000.0, ttfb_timeout_s=8.0)
    print(f"peak RSS {report['peak_rss_mib']:.0f} MiB, {meter.max_in_flight} answered at once")
    assert report["outcome"] == {"ok": len(items)}
    assert meter.max_in_flight >= 700 and report["observed"] <= target
    assert report["peak_rss_mib"] < 1024
