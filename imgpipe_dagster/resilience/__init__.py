"""Resilience for calls to GPU servers and image hosts: adaptive limiter, circuit breaker, retry policy, router.

No Dagster imports here. Facts are logged on the ``imgpipe.resilience`` logger as one-line,
grep-able messages ("Rate limit ...", "Breaker ...", "Router ...").
"""

from imgpipe_dagster.resilience.breaker import BreakerSet, BreakerState, CircuitBreaker, Permit
from imgpipe_dagster.resilience.limiter import AdaptiveLimiter, LimiterSlot, QueueFull, QueueTimeout
from imgpipe_dagster.resilience.retry import RetryPolicy, parse_retry_after
from imgpipe_dagster.resilience.router import Lease, Router
from imgpipe_dagster.resilience.settings import BreakerSettings, LimiterSettings, RetrySettings

__all__ = [
    "AdaptiveLimiter",
    "BreakerSet",
    "BreakerSettings",
    "BreakerState",
    "CircuitBreaker",
    "Lease",
    "LimiterSettings",
    "LimiterSlot",
    "Permit",
    "QueueFull",
    "QueueTimeout",
    "RetryPolicy",
    "RetrySettings",
    "Router",
    "parse_retry_after",
]
