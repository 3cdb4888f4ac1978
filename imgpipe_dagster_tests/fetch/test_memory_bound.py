"""Peak memory of a worker stays bounded whatever the input: 100 MP photos, pixel bombs, gzip and
brotli bombs and endless bodies fetched among normal photos, with the production byte and pixel caps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from imgpipe_dagster.fetch import ErrorClass
from imgpipe_dagster_tests.web.image_server import ImageServer

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

# runs in a fresh process so its peak RSS is the fetcher's alone (the server lives in the test process)
WORKER = r"""
import asyncio, json, sys
from dataclasses import replace
from imgpipe_dagster.fetch import ImageFetcher
from imgpipe_dagster.settings_map import medium_fetch_settings

items = json.loads(sys.stdin.read())
# production caps (max_bytes, max_image_pixels, queue and worker counts); only loopback is allowed
settings = medium_fetch_settings(allowed_networks=["127.0.0.0/8"], prefetch_download_timeout=20.0,
                   read_timeout_s=10.0, per_host_limit=64)

async def main():
    outcome = {}
    async with ImageFetcher(settings) as fetcher:
        async for result in fetcher.stream(items):
            outcome[result.key] = result.error.error_class.value if result.error else "ok"
    return outcome

outcome = asyncio.run(main())
# VmHWM is this process's own peak; ru_maxrss would also count the test process's RSS at exec (Linux
# carries the old address space's high-water mark over), over 1 GiB late in a full suite
peak_mib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
print(json.dumps({"outcome": outcome, "peak_rss_mib": peak_mib}))
"""

HOSTILE = {
    "huge-100mp": ("/fault/huge-100mp", ErrorClass.TOO_LARGE),
    "png-bomb": ("/fault/png-bomb", ErrorClass.DECOMPRESSION_BOMB),
    "png-bomb-64mp": ("/fault/png-bomb?side=8000", ErrorClass.DECOMPRESSION_BOMB),
    "gzip-bomb": ("/fault/gzip-bomb", ErrorClass.DECOMPRESSION_BOMB),
    "brotli-bomb": ("/fault/brotli-bomb", ErrorClass.DECOMPRESSION_BOMB),
    "endless": ("/fault/endless", ErrorClass.TOO_LARGE),
    "declared-huge": ("/fault/declared-huge", ErrorClass.TOO_LARGE),
}


def test_peak_rss_stays_under_1_gib_with_bombs_among_normal_photos(warm_image_server: ImageServer) -> None:
    good = warm_image_server.good_urls(60, min_megapixels=0.3, max_megapixels=4.0)
    warm_image_server.prerender(good)
    items = [[f"good-{i}", url] for i, url in enumerate(good)]
    # three copies of every hostile input, spread among the photos so several are in flight at once
    for copy in range(3):
        for kind, (path, _expected) in HOSTILE.items():
            items.insert(len(items) * (copy + 1) // 4, [f"{kind}-{copy}", warm_image_server.url(path)])
    completed = subprocess.run(
        [sys.executable, "-c", WORKER], input=json.dumps(items), capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    outcome = report["outcome"]
    assert len(outcome) == len(items)
    assert all(outcome[f"good-{i}"] == "ok" for i in range(len(good)))
    for kind, (_path, expected) in HOSTILE.items():
        assert [outcome[f"{kind}-{copy}"] for copy in range(3)] == [expected.value] * 3
    print(f"worker peak RSS {report['peak_rss_mib']:.0f} MiB for {len(items)} URLs")
    assert report["peak_rss_mib"] < 1024
