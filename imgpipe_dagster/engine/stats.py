"""Counters and latency samples of one run, summarised as a typed ``RunSummary`` for logs and reports."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class GpuThroughput:
    images: int
    images_per_s: float


@dataclass(frozen=True)
class RunSummary:
    """One run's figures, while it runs (progress) and when it ends (then with the shards' final states)."""

    urls_total: int
    urls_done: int  # written by this run, like the three below
    urls_failed_permanent: int
    urls_retry_later: int
    urls_returned_to_pending: int
    elapsed_s: float
    images_per_s: float
    download_ms_p50: float | None
    download_ms_p95: float | None
    inference_ms_p50: float | None
    inference_ms_p95: float | None
    failures_by_class: dict[str, int]
    per_gpu: dict[str, GpuThroughput]
    gpu_request_retries: int
    stage_seconds: dict[str, float]  # fetch, inference, write
    # URL state -> count over the run's shards, read after the run (None while it runs)
    final_state_counts: dict[str, int] | None = None
    router: dict[str, Any] | None = None  # the request router's snapshot: endpoints, limits, breakers
    # downloads in flight (mean, peak, limit), slot seconds by outcome kind, the tail after the first pass
    downloads: dict[str, Any] | None = None
    # URLs left in the pool with a future due time (retries, deferred hosts): count, next and last due time
    waiting_for_retry: dict[str, Any] | None = None

    def final_count(self, state: str) -> int:
        return (self.final_state_counts or {}).get(state, 0)

    @property
    def urls_unfinished(self) -> int:
        return sum(self.final_count(s) for s in ("pending", "leased", "failed_retryable"))

    @property
    def urls_waiting_for_retry(self) -> int:
        return (self.waiting_for_retry or {}).get("urls", 0)

    @property
    def failure_ratio(self) -> float:
        """URLs failed for good over URLs finished, across the shards' final states."""
        finished = self.final_count("done") + self.final_count("failed_permanent")
        return self.final_count("failed_permanent") / finished if finished else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunStats:
    total_urls: int = 0
    started_at: float = field(default_factory=time.monotonic)
    outcomes: Counter = field(default_factory=Counter)  # next state -> URLs written
    failures_by_class: Counter = field(default_factory=Counter)
    images_by_gpu: Counter = field(default_factory=Counter)
    gpu_busy_s: defaultdict = field(default_factory=lambda: defaultdict(float))
    gpu_retries: int = 0
    download_ms: list[float] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)
    stage_s: Counter = field(default_factory=Counter)  # seconds spent per stage (fetch, inference, write)
    # keep latency samples bounded on long runs: every Nth sample past the cap
    max_samples: int = 50_000

    def sample(self, bucket: list[float], value: float | None) -> None:
        if value is None:
            return
        if len(bucket) < self.max_samples or (len(bucket) + sum(self.outcomes.values())) % 10 == 0:
            bucket.append(value)

    @property
    def elapsed_s(self) -> float:
        return max(time.monotonic() - self.started_at, 1e-9)

    @property
    def finished(self) -> int:
        return self.outcomes["done"] + self.outcomes["failed_permanent"]

    @property
    def rate(self) -> float:
        return self.finished / self.elapsed_s

    def eta_s(self, remaining: int) -> float | None:
        return remaining / self.rate if self.rate > 0 else None

    def progress_line(self, remaining: int) -> str:
        eta = self.eta_s(remaining)
        failures = ", ".join(f"{k}={v}" for k, v in self.failures_by_class.most_common(5)) or "none"
        return (
            f"processed {self.finished}/{self.total_urls} URLs (done {self.outcomes['done']}, "
            f"failed {self.outcomes['failed_permanent']}, retry later {self.outcomes['failed_retryable']}), "
            f"{self.rate:.1f} images/s, ETA {f'{eta:.0f}s' if eta is not None else 'unknown'}, "
            f"failures: {failures}"
        )

    def summary(self, final_state_counts: dict[str, int] | None = None, router: dict[str, Any] | None = None,
                downloads: dict[str, Any] | None = None,
                waiting_for_retry: dict[str, Any] | None = None) -> RunSummary:  # fmt: skip
        elapsed = self.elapsed_s
        return RunSummary(
            urls_total=self.total_urls,
            urls_done=self.outcomes["done"],
            urls_failed_permanent=self.outcomes["failed_permanent"],
            urls_retry_later=self.outcomes["failed_retryable"],
            urls_returned_to_pending=self.outcomes["pending"],
            elapsed_s=round(elapsed, 2),
            images_per_s=round(self.rate, 3),
            download_ms_p50=percentile(self.download_ms, 50),
            download_ms_p95=percentile(self.download_ms, 95),
            inference_ms_p50=percentile(self.inference_ms, 50),
            inference_ms_p95=percentile(self.inference_ms, 95),
            failures_by_class=dict(self.failures_by_class),
            per_gpu={name: GpuThroughput(n, round(n / elapsed, 2)) for name, n in self.images_by_gpu.items()},
            gpu_request_retries=self.gpu_retries,
            stage_seconds={k: round(v, 2) for k, v in self.stage_s.items()},
            final_state_counts=dict(final_state_counts) if final_state_counts is not None else None,
            router=router,
            downloads=downloads,
            waiting_for_retry=waiting_for_retry,
        )
