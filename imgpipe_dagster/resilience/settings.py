"""Typed settings for the adaptive limiter, the circuit breaker and the retry policy.

Field names are the legacy ``.env`` names in lower-case snake_case. Fields holding a legacy value
have no default: ``imgpipe_dagster.settings_map`` fills them from a profile (``profiles/<name>.yaml``).
Fields the legacy did not have are marked "new" and may default. ``docs/RESILIENCE.md``
explains every field in prose, including how the legacy rates map onto a concurrency limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, kw_only=True)
class LimiterSettings:
    """Adaptive concurrency limiter for one GPU server (and the per-run cap the router applies)."""

    # Starting request rate (req/s); converted into the starting concurrency limit (see initial_limit).
    resilience_initial_rate: float
    # Rate floor (req/s); converted into the lowest concurrency limit the limiter may fall to.
    resilience_min_rate: float
    # Hard ceiling on request starts per second towards one server (a token-spacing pacer).
    resilience_max_rate: float
    # Highest concurrency limit (requests in flight) towards one server.
    resilience_max_concurrent: int
    # Most callers allowed to wait for a slot; one more raises QueueFull.
    resilience_max_queue: int
    # Per-run cap on GPU requests in flight across all servers (the router enforces it; 0 = no cap).
    max_concurrent_requests: int
    # Mean latency at or under which the limiter may grow (ms).
    target_response_time_ms: float
    # Mean latency above which the limiter decreases by rate_decrease_factor (ms).
    slow_threshold_ms: float
    # Latency above which a decrease uses rate_critical_decrease_factor instead (ms).
    critical_threshold_ms: float
    # Seconds between latency-driven adjustments (losses act at once, see rate_decrease_factor).
    rate_adjustment_interval: float
    # Most recent completed requests whose latencies form the control window.
    rate_window_size: int
    # Growth per interval when the limit is in use and latency is healthy (at least +1 slot).
    rate_increase_factor: float
    # Multiplier applied on a loss (429, timeout, error) or a slow window.
    rate_decrease_factor: float
    # Multiplier applied when the loss or the window is past critical_threshold_ms.
    rate_critical_decrease_factor: float
    # Longest a caller may wait for a slot before QueueTimeout (s).
    queue_timeout: float
    # new: mean latency above this multiple of the no-load baseline means the server is queueing: decrease.
    latency_tolerance: float = 1.3
    # new: the baseline is the lowest window mean over this many recent adjustment windows.
    baseline_windows: int = 20
    # new: fewest completions since the last adjustment for a latency-driven adjustment.
    rate_min_samples: int = 5

    def __post_init__(self) -> None:
        if self.resilience_max_rate <= 0 or self.resilience_max_concurrent < 1:
            raise ValueError("resilience_max_rate must be > 0 and resilience_max_concurrent >= 1")
        if not 0 < self.resilience_min_rate <= self.resilience_max_rate:
            raise ValueError("need 0 < resilience_min_rate <= resilience_max_rate")
        if not 0 < self.rate_critical_decrease_factor <= self.rate_decrease_factor < 1:
            raise ValueError("need 0 < rate_critical_decrease_factor <= rate_decrease_factor < 1")
        if self.rate_increase_factor < 1:
            raise ValueError("rate_increase_factor must be >= 1")

    @property
    def reference_latency_s(self) -> float:
        """Little's law latency at which the ceiling concurrency delivers the ceiling rate."""
        return self.resilience_max_concurrent / self.resilience_max_rate

    def rate_to_limit(self, rate: float) -> float:
        """Little's law: in flight = rate x latency, at the reference latency; at least one slot."""
        return max(1.0, rate * self.reference_latency_s)

    @property
    def min_limit(self) -> float:
        return min(self.rate_to_limit(self.resilience_min_rate), float(self.resilience_max_concurrent))

    @property
    def max_limit(self) -> float:
        return float(self.resilience_max_concurrent)

    @property
    def initial_limit(self) -> float:
        return min(max(self.rate_to_limit(self.resilience_initial_rate), self.min_limit), self.max_limit)

    def scaled(self, time_scale: float) -> LimiterSettings:
        """The same controller with every duration multiplied and every rate divided by time_scale."""
        return replace(
            self,
            resilience_initial_rate=self.resilience_initial_rate / time_scale,
            resilience_min_rate=self.resilience_min_rate / time_scale,
            resilience_max_rate=self.resilience_max_rate / time_scale,
            target_response_time_ms=self.target_response_time_ms * time_scale,
            slow_threshold_ms=self.slow_threshold_ms * time_scale,
            critical_threshold_ms=self.critical_threshold_ms * time_scale,
            rate_adjustment_interval=self.rate_adjustment_interval * time_scale,
            queue_timeout=self.queue_timeout * time_scale,
        )


@dataclass(frozen=True, kw_only=True)
class BreakerSettings:
    """Circuit breaker for one GPU server or one image host."""

    # Weighted failures that open the breaker once the window is full (legacy count; see window fields).
    circuit_failure_threshold: int
    # Probe successes in half-open that close the breaker.
    circuit_success_threshold: int
    # Seconds the breaker stays open before it admits probes.
    circuit_timeout_seconds: float
    # A successful call slower than this counts as a failure (ms).
    slow_call_threshold_ms: float
    # Weight of a timeout in the failure rate (an ordinary failure weighs 1).
    timeout_failure_weight: float
    # new: weighted failure share of the window that opens the breaker.
    circuit_failure_rate_threshold: float = 0.5
    # new: calls in the count-based window; None = circuit_failure_threshold / circuit_failure_rate_threshold.
    circuit_window_size: int | None = None
    # new: fewest calls in the window before the breaker may open; None = circuit_failure_threshold.
    circuit_minimum_calls: int | None = None
    # new: most probes in flight while half-open; None = circuit_success_threshold.
    circuit_half_open_probes: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.circuit_failure_rate_threshold <= 1:
            raise ValueError("circuit_failure_rate_threshold must be in (0, 1]")
        if self.circuit_failure_threshold < 1 or self.circuit_success_threshold < 1:
            raise ValueError("circuit thresholds must be >= 1")
        if self.window_size < self.minimum_calls:
            raise ValueError("circuit_window_size must be >= circuit_minimum_calls")

    @property
    def window_size(self) -> int:
        if self.circuit_window_size is not None:
            return self.circuit_window_size
        return math.ceil(self.circuit_failure_threshold / self.circuit_failure_rate_threshold)

    @property
    def minimum_calls(self) -> int:
        if self.circuit_minimum_calls is not None:
            return self.circuit_minimum_calls
        return self.circuit_failure_threshold

    @property
    def half_open_probes(self) -> int:
        if self.circuit_half_open_probes is not None:
            return max(1, self.circuit_half_open_probes)
        return self.circuit_success_threshold

    @classmethod
    def for_image_hosts(cls) -> BreakerSettings:
        """Defaults for one breaker per image host: a host that fails half of 40 calls is left alone 5 min."""
        return cls(
            circuit_failure_threshold=20,
            circuit_success_threshold=1,
            circuit_timeout_seconds=300.0,
            slow_call_threshold_ms=30000.0,
            timeout_failure_weight=1.0,
        )


@dataclass(frozen=True, kw_only=True)
class RetrySettings:
    """Retry policy for one kind of call (GPU request or image download)."""

    # Retries after the first attempt (so at most 1 + retry_attempts attempts).
    retry_attempts: int
    # Base delay of exponential backoff with full jitter (s): retry n waits U(0, retry_delay * 2**(n-1)).
    retry_delay: float
    # new: cap on one backoff delay (s).
    max_backoff_s: float = 60.0
    # new: retries may add at most this share of first attempts (token bucket).
    retry_budget_ratio: float = 0.2
    # new: retry tokens available at start, so a quiet pipeline can still retry a little.
    retry_budget_initial_tokens: float = 10.0
    # new: most tokens the budget can hold, so a long healthy stretch cannot bank a retry storm.
    retry_budget_max_tokens: float = 100.0
    # new: a Retry-After longer than this is clamped (s); callers may defer the item instead.
    max_retry_after_s: float = 300.0
    # new: HTTP statuses worth retrying.
    retryable_statuses: frozenset[int] = field(
        default_factory=lambda: frozenset({408, 425, 429, 500, 502, 503, 504})
    )
