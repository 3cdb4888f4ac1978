"""Settings of one shard run: the engine's typed view of a worker profile.

``imgpipe_dagster.settings_map.engine_settings`` builds them from a validated profile
(``profiles/<name>.yaml``); fields holding a profile value have no default here.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgpipe_dagster.fetch.settings import FetchSettings
from imgpipe_dagster.resilience.settings import BreakerSettings, LimiterSettings, RetrySettings


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    # rows per result transaction (legacy CHUNK_SIZE)
    chunk_size: int
    # result chunks written at once (legacy MAX_CONCURRENT_CHUNKS; one DB connection each)
    max_concurrent_chunks: int
    # GPU requests being assembled or in flight (legacy MAX_CONCURRENT_BATCHES)
    max_concurrent_batches: int
    # images per GPU request; the server merges requests into its batches (profile, new)
    images_per_request: int
    # seconds one GPU request may take (legacy REQUEST_TIMEOUT)
    request_timeout: float
    # URL lease; renewed every quarter of it while the run lives (profile, new)
    lease_seconds: float
    # tries of one GPU request (server busy or down) before its URLs go back to pending, uncharged (profile, new)
    max_gpu_tries: int
    # prompt file name under resources/prompts
    prompt_name: str = "analysis_v1"
    # seconds a partly filled request waits for more images
    request_fill_wait_s: float = 0.25
    # seconds between progress lines
    progress_interval_s: float = 10.0
    # retries after the first attempt of an image the GPU server answered for with an error
    # (inference has its own budget: a download retry says nothing about the model)
    inference_retry_attempts: int = 2
    # base delay of the inference retries' backoff (s)
    inference_retry_delay_s: float = 1.0
    # when nothing is claimable and only retries that are not due yet are left, a run waits for them
    # at most this long (s); later ones stay in the pool with their due time for a later run
    retry_wait_s: float = 2.0
    # seconds a URL whose host deferred it waits when the fetcher named no time; also the due time of
    # a tail the run hands back (below)
    host_deferral_s: float = 30.0
    # a run hands its tail back to the pool and ends (engine/tail.py) when, after fresh work ran out,
    # URLs got through it at under tail_slow_share of its pace for tail_window_s seconds, and the hosts
    # of the URLs left held at most tail_host_share of the run's URLs (else they are its backlog)
    tail_window_s: float = 1.0
    tail_slow_share: float = 0.25
    tail_host_share: float = 0.5
    # downloads in flight (engine/inflight.py) start at and never go below the legacy
    # prefetch_concurrent_downloads, and stay under FetchSettings.max_in_flight_ceiling and this
    # machine-wide budget: downloads in flight of all runs on this machine together (under IMGPIPE_HOME)
    machine_downloads_in_flight: int = 4096
    # image rate the GPU tier can take (images/s); 0 = learn it from images waiting for the GPU tier
    gpu_capacity_images_per_s: float = 0.0
    # downloads are sized for the GPU tier's rate times this
    gpu_rate_headroom: float = 1.25
    # seconds between two sizings of the downloads in flight
    in_flight_interval_s: float = 1.0


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    run: RunSettings
    fetch: FetchSettings
    limiter: LimiterSettings
    breaker: BreakerSettings
    fetch_retry: RetrySettings
