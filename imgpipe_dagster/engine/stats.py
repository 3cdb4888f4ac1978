"""Counters and latency samples of one run, summarised for logs and Dagster metadata."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


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

    def summary(self) -> dict:
        per_gpu = {
            name: {"images": n, "images_per_s": round(n / self.elapsed_s, 2)} for name, n in self.images_by_gpu.items()
        }
        return {
            "urls_total": self.total_urls,
            "urls_done": self.outcomes["done"],
            "urls_failed_permanent": self.outcomes["failed_permanent"],
            "urls_retry_later": self.outcomes["failed_retryable"],
            "urls_returned_to_pending": self.outcomes["pending"],
            "elapsed_s": round(self.elapsed_s, 2),
            "images_per_s": round(self.rate, 3),
            "download_ms_p50": percentile(self.download_ms, 50),
            "download_ms_p95": percentile(self.download_ms, 95),
            "inference_ms_p50": percentile(self.inference_ms, 50),
            "inference_ms_p95": percentile(self.inference_ms, 95),
            "failures_by_class": dict(self.failures_by_class),
            "per_gpu": per_gpu,
            "gpu_request_retries": self.gpu_retries,
            "stage_seconds": {k: round(v, 2) for k, v in self.stage_s.items()},
        }
