"""Settings of one shard run (the engine's view of a worker profile)."""

from __future__ import annotations

from dataclasses import dataclass, field

from imgpipe_dagster.fetch.settings import FetchSettings
from imgpipe_dagster.resilience.settings import BreakerSettings, LimiterSettings, RetrySettings


@dataclass(frozen=True)
class RunSettings:
    # rows per result transaction (legacy CHUNK_SIZE)
    chunk_size: int = 100
    # result chunks written at once (legacy MAX_CONCURRENT_CHUNKS; one DB connection each)
    max_concurrent_chunks: int = 15
    # GPU requests being assembled or in flight (legacy MAX_CONCURRENT_BATCHES)
    max_concurrent_batches: int = 15
    # images per GPU request; the server merges requests into its batches
    images_per_request: int = 32
    # seconds a partly filled request waits for more images
    request_fill_wait_s: float = 0.25
    # seconds one GPU request may take (legacy REQUEST_TIMEOUT)
    request_timeout: float = 120.0
    # URL lease; renewed every quarter of it while the run lives
    lease_seconds: float = 120.0
    # prompt file name under resources/prompts
    prompt_name: str = "analysis_v1"
    # tries of one GPU request (server busy or down) before its URLs go back to pending, uncharged
    max_gpu_tries: int = 50
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
    # seconds a URL whose host deferred it waits when the fetcher named no time
    host_deferral_s: float = 30.0
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


@dataclass(frozen=True)
class EngineSettings:
    run: RunSettings = field(default_factory=RunSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    limiter: LimiterSettings = field(default_factory=LimiterSettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    fetch_retry: RetrySettings = field(default_factory=RetrySettings)


def engine_settings(worker, fetch: FetchSettings, prompt_name: str = "analysis_v1") -> EngineSettings:
    """Engine settings from a validated worker profile (imgpipe_dagster.profiles.WorkerProfile)."""
    return EngineSettings(
        run=RunSettings(
            chunk_size=worker.chunk_size,
            max_concurrent_chunks=worker.max_concurrent_chunks,
            max_concurrent_batches=worker.max_concurrent_batches,
            images_per_request=worker.images_per_request,
            request_timeout=worker.request_timeout,
            lease_seconds=worker.lease_seconds,
            prompt_name=prompt_name,
        ),
        fetch=fetch,
        limiter=LimiterSettings(
            resilience_initial_rate=worker.resilience_initial_rate,
            resilience_min_rate=worker.resilience_min_rate,
            resilience_max_rate=worker.resilience_max_rate,
            resilience_max_concurrent=worker.resilience_max_concurrent,
            resilience_max_queue=worker.resilience_max_queue,
            max_concurrent_requests=worker.max_concurrent_requests,
            target_response_time_ms=worker.target_response_time_ms,
            slow_threshold_ms=worker.slow_threshold_ms,
            critical_threshold_ms=worker.critical_threshold_ms,
            rate_adjustment_interval=worker.rate_adjustment_interval,
            rate_window_size=worker.rate_window_size,
            rate_increase_factor=worker.rate_increase_factor,
            rate_decrease_factor=worker.rate_decrease_factor,
            rate_critical_decrease_factor=worker.rate_critical_decrease_factor,
            queue_timeout=worker.queue_timeout,
        ),
        breaker=BreakerSettings(
            circuit_failure_threshold=worker.circuit_failure_threshold,
            circuit_success_threshold=worker.circuit_success_threshold,
            circuit_timeout_seconds=worker.circuit_timeout_seconds,
            slow_call_threshold_ms=worker.slow_call_threshold_ms,
            timeout_failure_weight=worker.timeout_failure_weight,
        ),
        fetch_retry=RetrySettings(retry_attempts=worker.retry_attempts, retry_delay=worker.retry_delay),
    )
