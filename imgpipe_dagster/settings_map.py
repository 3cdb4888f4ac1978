"""The one mapping from a validated profile to each side's typed settings.

``profiles/<name>.yaml`` is the one source of profile values; ``imgpipe_dagster.profiles`` loads and
validates it into ``WorkerProfile`` / ``GpuServerProfile``. This module turns those into what the
two sides run with, field by field, and nothing else copies a profile value:

- worker side: ``engine_settings`` -> ``EngineSettings`` (``RunSettings``, ``FetchSettings``,
  ``LimiterSettings``, ``BreakerSettings``, ``RetrySettings``), what ``engine.runner.ShardRunner`` takes;
- GPU side: ``server_settings`` -> ``ServerSettings`` with its ``ModelSettings`` part, what the
  launcher hands to a server process as one JSON file.

Values that are not profile values (the deployment: model path, token, user agent...) come in as
arguments. ``profile_engine_settings`` and ``medium_*`` give tests and benchmarks a complete object
from a profile file (``profiles/medium.yaml`` unless named).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from imgpipe_dagster.engine.settings import EngineSettings, RunSettings
from imgpipe_dagster.fetch.settings import FetchSettings
from imgpipe_dagster.gpu_server.prompts import DEFAULT_PROMPT
from imgpipe_dagster.gpu_server.settings import ModelSettings, ServerSettings
from imgpipe_dagster.profiles import GpuServerProfile, WorkerProfile, resolve
from imgpipe_dagster.resilience.settings import BreakerSettings, LimiterSettings, RetrySettings


def run_settings(worker: WorkerProfile, prompt_name: str = DEFAULT_PROMPT) -> RunSettings:
    return RunSettings(
        chunk_size=worker.chunk_size,
        max_concurrent_chunks=worker.max_concurrent_chunks,
        max_concurrent_batches=worker.max_concurrent_batches,
        images_per_request=worker.images_per_request,
        request_timeout=worker.request_timeout,
        lease_seconds=worker.lease_seconds,
        max_gpu_tries=worker.max_gpu_tries,
        prompt_name=prompt_name,
    )


def fetch_settings(worker: WorkerProfile, **policy: Any) -> FetchSettings:
    """The profile's download fields; ``policy`` sets the other FetchSettings fields (user agent,
    allowed networks, byte and pixel caps), which belong to the deployment, not to a profile."""
    return FetchSettings(
        connection_pool_size=worker.connection_pool_size,
        enable_keepalive=worker.enable_keepalive,
        enable_prefetch=worker.enable_prefetch,
        prefetch_queue_size=worker.prefetch_queue_size,
        prefetch_concurrent_downloads=worker.prefetch_concurrent_downloads,
        prefetch_download_timeout=worker.prefetch_download_timeout,
        image_resize_threads=worker.image_resize_threads,
        **policy,
    )


def limiter_settings(worker: WorkerProfile) -> LimiterSettings:
    return LimiterSettings(
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
    )


def breaker_settings(worker: WorkerProfile) -> BreakerSettings:
    return BreakerSettings(
        circuit_failure_threshold=worker.circuit_failure_threshold,
        circuit_success_threshold=worker.circuit_success_threshold,
        circuit_timeout_seconds=worker.circuit_timeout_seconds,
        slow_call_threshold_ms=worker.slow_call_threshold_ms,
        timeout_failure_weight=worker.timeout_failure_weight,
    )


def retry_settings(worker: WorkerProfile) -> RetrySettings:
    return RetrySettings(retry_attempts=worker.retry_attempts, retry_delay=worker.retry_delay)


def engine_settings(
    worker: WorkerProfile, fetch: FetchSettings | None = None, prompt_name: str = DEFAULT_PROMPT
) -> EngineSettings:
    """Everything a shard run needs from a worker profile; ``fetch`` defaults to the profile's
    download fields with FetchSettings' own policy defaults."""
    return EngineSettings(
        run=run_settings(worker, prompt_name),
        fetch=fetch if fetch is not None else fetch_settings(worker),
        limiter=limiter_settings(worker),
        breaker=breaker_settings(worker),
        fetch_retry=retry_settings(worker),
    )


def model_settings(gpu: GpuServerProfile, model_path: str, **deployment: Any) -> ModelSettings:
    """The model part: the profile's model flags; ``deployment`` sets the other ModelSettings fields
    (device, compile switches, random weights...)."""
    return ModelSettings(
        model_path=model_path,
        use_fp16=gpu.use_fp16,
        enable_tf32=gpu.enable_tf32,
        use_flash_attention=gpu.use_flash_attention,
        max_new_tokens=gpu.max_new_tokens,
        clear_cache_every_n_requests=gpu.clear_cache_every_n_requests,
        enable_memory_defrag=gpu.enable_memory_defrag,
        **deployment,
    )


def server_settings(gpu: GpuServerProfile, model: ModelSettings, **deployment: Any) -> ServerSettings:
    """One server's settings: the profile's batching and queue fields, the model part, and the
    ``deployment`` fields (host, port, bearer_token, idle_timeout_s, request caps)."""
    return ServerSettings(
        max_concurrent_generations=gpu.max_concurrent_generations,
        max_inference_queue_size=gpu.max_inference_queue_size,
        max_inference_batch_size=gpu.max_inference_batch_size,
        batch_wait_timeout=gpu.batch_wait_timeout,
        gen_time_default_est=gpu.gen_time_default_est,
        max_batch_images=gpu.max_batch_images,
        model=model,
        **deployment,
    )


def profile_server_settings(
    profile: str, model_path: str, gpu_overrides: dict[str, Any] | None = None, **deployment: Any
) -> ServerSettings:
    """A named profile's server settings; ``deployment`` as for ``server_settings``."""
    _, gpu = resolve(profile, gpu_overrides=gpu_overrides)
    return server_settings(gpu, model_settings(gpu, model_path), **deployment)


# ----- complete objects for tests and benchmarks: a profile, then named changes -----


def profile_engine_settings(
    profile: str = "medium", fetch: FetchSettings | None = None, **worker_overrides: Any
) -> EngineSettings:
    """A named profile's engine settings, with validated worker overrides."""
    worker, _ = resolve(profile, worker_overrides=worker_overrides)
    return engine_settings(worker, fetch)


def medium_fetch_settings(**changes: Any) -> FetchSettings:
    """Medium's download fields with FetchSettings' policy defaults; ``changes`` may set any field."""
    worker, _ = resolve("medium")
    return replace(fetch_settings(worker), **changes)


def medium_model_settings(model_path: str, **changes: Any) -> ModelSettings:
    """Medium's model part; ``changes`` may set any ModelSettings field (profile ones included)."""
    _, gpu = resolve("medium")
    model = model_settings(gpu, model_path)
    return ModelSettings(**{**model.__dict__, **changes})


def medium_server_settings(model_path: str, **changes: Any) -> ServerSettings:
    """Medium's server settings; ``changes`` may set any ServerSettings or ModelSettings field."""
    model_names = set(ModelSettings.__dataclass_fields__)
    model_changes = {name: value for name, value in changes.items() if name in model_names}
    server_changes = {name: value for name, value in changes.items() if name not in model_names}
    _, gpu = resolve("medium")
    return server_settings(gpu, medium_model_settings(model_path, **model_changes)).replace(**server_changes)
