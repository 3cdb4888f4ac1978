"""One engine run as its own process, so the chaos test can SIGKILL it mid-run.

    python -m imgpipe_dagster_tests.reliability.chaos_worker <database_url> <owner> <shards,> <endpoints,> <gpu_state_dir>

Prints the run's summary as one JSON line when it ends. The settings are the chaos test's: short
timeouts and leases so faults and lost leases cost seconds, not minutes. Like a Dagster run in managed
mode, the worker watches the launcher's servers it uses and restarts one that dies (gpu_server/watchdog.py).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace

from imgpipe_dagster.engine.runner import ShardRunner
from imgpipe_dagster.engine.settings import EngineSettings
from imgpipe_dagster.fetch.settings import FetchSettings
from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.gpu_server.watchdog import ServerWatchdog
from imgpipe_dagster.profiles import resolve
from imgpipe_dagster.settings_map import engine_settings, medium_fetch_settings

# Worker overrides of the medium profile: small requests and chunks so a 5,000-URL run has many of
# each, a 5 s lease so a killed run's URLs come back quickly, fast retries.
WORKER_OVERRIDES = {
    "images_per_request": 8, "chunk_size": 25, "max_concurrent_batches": 8, "max_concurrent_chunks": 3,
    "lease_seconds": 5, "retry_delay": 0.2, "prefetch_concurrent_downloads": 32, "prefetch_queue_size": 32,
    "request_timeout": 60, "circuit_timeout_seconds": 2, "image_resize_threads": 2,
}  # fmt: skip
# The short caption prompt keeps the tiny CPU model's prefill small (the chaos is not about prompts).
PROMPT = "caption_short_v1"
# Longest deferral of a retry once the retry budget is spent (the default, 60 s, would idle the test).
MAX_BACKOFF_S = 2.0


def chaos_fetch_settings() -> FetchSettings:
    """Loopback allowed; the read timeout (3 s) sits between the trickle interval (0.2 s) and the
    deadline (6 s), with room for a loaded 2-core CI machine to serve good images in time."""
    return medium_fetch_settings(
        allowed_networks=["127.0.0.0/8"],
        prefetch_download_timeout=6.0,
        connect_timeout_s=2.0,
        read_timeout_s=3.0,
        dns_timeout_s=2.0,
        max_bytes=8 * 1024 * 1024,
        prefetch_concurrent_downloads=32,
        prefetch_queue_size=32,
        image_resize_threads=2,
        # One loopback image server stands in for the whole web here, and it serves the faults too.
        # Its politeness rate and host cap would hold the run to 20 URLs/s; its hanging, trickling and
        # resetting fault URLs would open the breaker of the one host every good URL shares, and the
        # dead fault addresses would end HOST_UNREACHABLE instead of in their own classes with their
        # retry counts, which is what this test checks. Host health has its tests (fetch/test_hosts.py).
        per_host_limit=64,
        per_host_requests_per_s=1e6,
        host_failures_to_open=1000,
        target_pixels=112 * 112,  # tiny images for the tiny CPU model
    )


def chaos_engine_settings() -> EngineSettings:
    worker, _ = resolve("medium", WORKER_OVERRIDES)
    settings = engine_settings(worker, chaos_fetch_settings(), prompt_name=PROMPT)
    return replace(
        settings,
        run=replace(settings.run, progress_interval_s=5.0),
        fetch_retry=replace(settings.fetch_retry, max_backoff_s=MAX_BACKOFF_S),
    )


def main(argv: list[str]) -> int:
    database_url, owner, shards, endpoints, gpu_state_dir = argv
    logging.basicConfig(level=logging.WARNING, format=f"[{owner}] %(levelname)s %(name)s: %(message)s")
    runner = ShardRunner(
        database_url, owner, shards.split(","), chaos_engine_settings(), endpoints.split(","),
        progress=lambda line, summary: print(f"[{owner}] {line}", file=sys.stderr, flush=True),
        reuse_duplicates=False,  # the corpus repeats its photos: every image goes to the GPU tier under attack
    )  # fmt: skip
    launcher = GpuServerLauncher(gpu_state_dir)
    watched = [e for e in launcher.recorded_endpoints() if e.url in endpoints.split(",")]
    with ServerWatchdog(launcher, watched):  # reports on the imgpipe.gpu_server.watchdog logger (stderr)
        summary = runner.run()
    print(json.dumps(summary.as_dict(), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
