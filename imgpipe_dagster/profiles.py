"""Throughput profiles: the legacy conservative / medium / aggressive settings as Dagster run config.

``profiles/<name>.yaml`` is the one source of a profile's values: every legacy value under its legacy
name, plus our new fields. It is valid run config of the ``image_analysis`` asset (the
``analyze_<name>`` jobs carry it as their preset; ``profile_run_config`` reads it).

Here: ``resolve(name, worker_overrides, gpu_overrides)`` merges the file with the non-empty
overrides of a run (``assets/config.py`` derives its override fields from these models) and validates
the result into ``WorkerProfile`` (the worker side, legacy image-analyzer-enterprise/.env) and
``GpuServerProfile`` (the GPU server side, legacy llm_model/.env): types, ranges and orderings, with
errors that name the field. ``STEP_DOWN`` / ``STEP_UP`` are the throttle's profile order.

The engine never sees these classes: ``imgpipe_dagster.settings_map`` turns them into the typed
settings of each side (``EngineSettings`` for a shard run, ``ServerSettings`` for a GPU server).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imgpipe_dagster.paths import project_root, resources_dir

ProfileName = Literal["conservative", "medium", "aggressive"]
PROFILE_NAMES: tuple[str, ...] = get_args(ProfileName)
# Unattended nights and automatic step-downs go this way.
STEP_DOWN = {"aggressive": "medium", "medium": "conservative", "conservative": "conservative"}
STEP_UP = {"conservative": "medium", "medium": "aggressive", "aggressive": "aggressive"}


class ProfileError(ValueError):
    """A profile or an override is invalid; the message names the field."""


class WorkerProfile(BaseModel):
    """Worker side (legacy image-analyzer-enterprise/.env), one field per legacy setting."""

    model_config = ConfigDict(extra="forbid")

    # shard runs in flight (the throttle sensor's ceiling)
    max_concurrent_workers: int = Field(ge=1, le=256)
    # ceiling of in-flight GPU requests per run (the adaptive limiter's per-run cap)
    max_concurrent_requests: int = Field(ge=1, le=4096)
    # image batches being assembled or in flight per run
    max_concurrent_batches: int = Field(ge=1, le=4096)
    # result chunks being written at once per run (database connections of the writer)
    max_concurrent_chunks: int = Field(ge=1, le=64)
    # rows per result transaction
    chunk_size: int = Field(ge=1, le=100_000)
    # pooled HTTP connections for image downloads
    connection_pool_size: int = Field(ge=1, le=10_000)
    enable_keepalive: bool
    resilience_initial_rate: float = Field(gt=0)
    resilience_min_rate: float = Field(gt=0)
    resilience_max_rate: float = Field(gt=0)
    # ceiling of in-flight requests per GPU server
    resilience_max_concurrent: int = Field(ge=1, le=4096)
    # client-side queue bound: work beyond it is rejected, not piled up
    resilience_max_queue: int = Field(ge=1)
    target_response_time_ms: float = Field(gt=0)
    slow_threshold_ms: float = Field(gt=0)
    critical_threshold_ms: float = Field(gt=0)
    rate_adjustment_interval: float = Field(gt=0)
    rate_window_size: int = Field(ge=1)
    rate_increase_factor: float = Field(ge=1.0, le=4.0)
    rate_decrease_factor: float = Field(gt=0, lt=1.0)
    rate_critical_decrease_factor: float = Field(gt=0, lt=1.0)
    circuit_failure_threshold: int = Field(ge=1)
    circuit_success_threshold: int = Field(ge=1)
    circuit_timeout_seconds: float = Field(gt=0)
    slow_call_threshold_ms: float = Field(gt=0)
    timeout_failure_weight: float = Field(ge=0)
    # seconds one GPU request may take
    request_timeout: float = Field(gt=0)
    # seconds work may wait for a slot before it is rejected
    queue_timeout: float = Field(gt=0)
    retry_attempts: int = Field(ge=0, le=20)
    # base of exponential backoff with full jitter, seconds
    retry_delay: float = Field(ge=0)
    enable_prefetch: bool
    prefetch_queue_size: int = Field(ge=1)
    prefetch_concurrent_downloads: int = Field(ge=1, le=10_000)
    prefetch_download_timeout: float = Field(gt=0)
    image_resize_threads: int = Field(ge=1, le=256)
    # new: images per GPU request (the server merges requests into its batches)
    images_per_request: int = Field(default=32, ge=1, le=1024)
    # new: URL lease in seconds; renewed while the run lives, reclaimed after a crash
    lease_seconds: float = Field(default=120, ge=5)
    # new: tries of one GPU request (server busy or down) before its URLs go back to pending, uncharged
    max_gpu_tries: int = Field(default=50, ge=1, le=10_000)

    @model_validator(mode="after")
    def _ordered(self) -> WorkerProfile:
        if not self.resilience_min_rate <= self.resilience_initial_rate <= self.resilience_max_rate:
            raise ValueError(
                "need resilience_min_rate <= resilience_initial_rate <= resilience_max_rate, got "
                f"{self.resilience_min_rate} / {self.resilience_initial_rate} / {self.resilience_max_rate}"
            )
        if not self.target_response_time_ms <= self.slow_threshold_ms <= self.critical_threshold_ms:
            raise ValueError("need target_response_time_ms <= slow_threshold_ms <= critical_threshold_ms")
        if self.rate_critical_decrease_factor > self.rate_decrease_factor:
            raise ValueError("need rate_critical_decrease_factor <= rate_decrease_factor")
        return self


class GpuServerProfile(BaseModel):
    """GPU server side (legacy llm_model/.env)."""

    model_config = ConfigDict(extra="forbid")

    # batches in the server's pipeline at once (CPU preparation overlapping the one generate())
    max_concurrent_generations: int = Field(ge=1, le=64)
    # images waiting for a batch before the server answers 429
    max_inference_queue_size: int = Field(ge=1)
    # requests merged into one generate() (a request carries images_per_request images)
    max_inference_batch_size: int = Field(ge=1, le=4096)
    batch_wait_timeout: float = Field(ge=0, le=60)
    gen_time_default_est: float = Field(gt=0)
    clear_cache_every_n_requests: int = Field(ge=0)
    enable_memory_defrag: bool
    use_fp16: bool
    enable_tf32: bool
    use_flash_attention: bool
    max_new_tokens: int = Field(ge=1, le=4096)
    # new: most images in one generate()
    max_batch_images: int = Field(default=256, ge=1, le=4096)


def profiles_dir() -> Path:
    root = project_root()
    if root and (root / "profiles").is_dir():
        return root / "profiles"
    return resources_dir() / "profiles"


@cache
def profile_run_config(name: str) -> dict:
    """The complete run config of a profile, as in profiles/<name>.yaml."""
    if name not in PROFILE_NAMES:
        raise ProfileError(f"unknown profile {name!r}; choose one of {', '.join(PROFILE_NAMES)}")
    return yaml.safe_load((profiles_dir() / f"{name}.yaml").read_text())


def profile_values(name: str) -> dict:
    return profile_run_config(name)["ops"]["image_analysis"]["config"]


def _validate(model: type[BaseModel], values: dict, section: str) -> BaseModel:
    try:
        return model(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "(profile)"
            problems.append(f"{section}.{where}: {error['msg']}")
        raise ProfileError("invalid profile settings: " + "; ".join(problems)) from None


def resolve(name: str, worker_overrides: dict | None = None, gpu_overrides: dict | None = None):
    """The named profile's values with the non-empty overrides applied, validated."""
    base = profile_values(name)
    worker = {**base["worker"], **{k: v for k, v in (worker_overrides or {}).items() if v is not None}}
    gpu = {**base["gpu_server"], **{k: v for k, v in (gpu_overrides or {}).items() if v is not None}}
    return _validate(WorkerProfile, worker, "worker"), _validate(GpuServerProfile, gpu, "gpu_server")
