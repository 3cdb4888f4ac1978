"""Retry policy: which failures to retry, how long to wait, and a budget so retries stay a bounded share.

Why our own: ``tenacity`` and ``backoff`` own the call loop and sleep inside it, and neither has
a retry budget shared across calls nor a Retry-After rule; our engine schedules retries itself
(a failed URL goes back to the queue), so it needs a policy object to consult, not a decorator.

* ``should_retry(retryable, attempt)``: only retryable classes, at most ``retry_attempts``
  retries after the first attempt, and only while the budget has a token (it takes one).
* ``delay(attempt, retry_after)``: full jitter, ``U(0, min(max_backoff_s, retry_delay * 2**(attempt-1)))``,
  and never earlier than the server's Retry-After (clamped to ``max_retry_after_s``).
* Budget: a token bucket; each first attempt adds ``retry_budget_ratio`` tokens (up to
  ``retry_budget_max_tokens``), each retry spends one, and the bucket starts with
  ``retry_budget_initial_tokens``. So retries <= initial + ratio x first attempts, always.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
from datetime import UTC, datetime

from imgpipe_dagster.resilience.settings import RetrySettings

logger = logging.getLogger("imgpipe.resilience")


class RetryPolicy:
    def __init__(self, settings: RetrySettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._tokens = self.settings.retry_budget_initial_tokens
        self.counters: dict[str, int] = {
            "first_attempts": 0,
            "retries": 0,
            "denied_not_retryable": 0,
            "denied_attempts": 0,
            "denied_budget": 0,
        }

    def note_first_attempt(self) -> None:
        """Call once per item's first attempt: it earns the budget ``retry_budget_ratio`` tokens."""
        with self._lock:
            self.counters["first_attempts"] += 1
            self._tokens = min(
                self.settings.retry_budget_max_tokens, self._tokens + self.settings.retry_budget_ratio
            )

    def should_retry(self, retryable: bool, attempt: int) -> bool:
        """After failed attempt number ``attempt`` (1 = the first), may the item be tried again?

        A True answer spends one retry token, so ask once per failure and retry when it says so.
        """
        with self._lock:
            if not retryable:
                self.counters["denied_not_retryable"] += 1
                return False
            if attempt > self.settings.retry_attempts:
                self.counters["denied_attempts"] += 1
                return False
            if self._tokens < 1.0:
                self.counters["denied_budget"] += 1
                logger.debug("Retry budget empty: %.2f tokens", self._tokens)
                return False
            self._tokens -= 1.0
            self.counters["retries"] += 1
            return True

    def is_retryable_status(self, status: int) -> bool:
        return status in self.settings.retryable_statuses

    def backoff_cap(self, attempt: int) -> float:
        """Upper end of the jitter range before retry number ``attempt`` (1 = first retry)."""
        exponent = min(max(attempt, 1) - 1, 62)
        return min(self.settings.max_backoff_s, self.settings.retry_delay * (2.0**exponent))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt``: full jitter, never before Retry-After."""
        with self._lock:
            jittered = self._rng.uniform(0.0, self.backoff_cap(attempt))
        if retry_after is None:
            return jittered
        return max(jittered, min(max(retry_after, 0.0), self.settings.max_retry_after_s))

    @property
    def tokens(self) -> float:
        return self._tokens

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"budget_tokens": round(self._tokens, 3), "counters": dict(self.counters)}


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())
