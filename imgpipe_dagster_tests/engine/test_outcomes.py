"""The outcome classifier: a fetch result or an analysis in, the URL's next state out."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from imgpipe_dagster.engine import outcomes
from imgpipe_dagster.fetch import ErrorClass, FetchError, FetchResult
from imgpipe_dagster.gpu_server.client import ImageAnalysis
from imgpipe_dagster.resilience.retry import RetryPolicy
from imgpipe_dagster.resilience.settings import RetrySettings
from imgpipe_dagster.store.work import ClaimedUrl

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CLAIMED = ClaimedUrl(b"h" * 16, "http://img.example/1.jpg", "s000001", attempts=1)


def policy(attempts: int = 2) -> RetryPolicy:
    return RetryPolicy(RetrySettings(retry_attempts=attempts, retry_delay=1.0), rng=random.Random(1))


def failed(error_class: ErrorClass, retry_after: float | None = None) -> FetchResult:
    return FetchResult(key=CLAIMED, url=CLAIMED.url, ok=False, download_ms=12.0,
                       error=FetchError(error_class, "boom", retry_after=retry_after))  # fmt: skip


def test_a_retryable_failure_spends_one_attempt_and_waits_at_least_retry_after():
    outcome = outcomes.fetch_failure(CLAIMED, failed(ErrorClass.HTTP_429, retry_after=30), policy(), NOW,
                                     deferral_s=60)  # fmt: skip
    assert outcome.state == "failed_retryable" and outcome.attempts == 2
    assert outcome.next_attempt_at >= NOW + timedelta(seconds=30)
    assert outcome.error_class == "http_429" and outcome.result["download_ms"] == 12.0


def test_a_retryable_failure_past_its_attempts_is_final():
    outcome = outcomes.fetch_failure(CLAIMED, failed(ErrorClass.RESET), policy(attempts=1), NOW, deferral_s=60)
    assert outcome.state == "failed_permanent" and outcome.attempts == 2 and outcome.next_attempt_at is None


def test_a_permanent_failure_is_final_at_once():
    outcome = outcomes.fetch_failure(CLAIMED, failed(ErrorClass.HTTP_404), policy(), NOW, deferral_s=60)
    assert outcome.state == "failed_permanent" and outcome.error_class == "http_404"


def test_a_deferred_host_returns_the_url_without_spending_a_retry():
    deferred = outcomes.fetch_failure(CLAIMED, failed(ErrorClass.HOST_DEFERRED, retry_after=45), policy(), NOW,
                                      deferral_s=60)  # fmt: skip
    assert deferred.state == "pending" and deferred.attempts == CLAIMED.attempts
    assert deferred.next_attempt_at == NOW + timedelta(seconds=45)
    assert deferred.result == {}  # no result row: the URL is not final
    unnamed = outcomes.fetch_failure(CLAIMED, failed(ErrorClass.HOST_DEFERRED), policy(), NOW, deferral_s=60)
    assert unnamed.next_attempt_at == NOW + timedelta(seconds=60)


def test_inference_failures_use_their_own_retry_settings():
    image = FetchResult(key=CLAIMED, url=CLAIMED.url, ok=True, image_bytes=b"jpeg", width=10, height=10)
    bad = ImageAnalysis(text=None, analysis=None, parse_ok=False, model="m", prompt_version="v", prompt_tokens=0,
                        generated_tokens=0, error="CUDA error", batch_size=1, timings={})  # fmt: skip
    retried = outcomes.analysed(CLAIMED, image, bad, "gpu0", policy(attempts=2), NOW)
    assert retried.state == "failed_retryable" and retried.error_class == "inference_error"
    final = outcomes.analysed(CLAIMED, image, bad, "gpu0", policy(attempts=0), NOW)
    assert final.state == "failed_permanent"


def test_an_analysed_image_is_done_with_its_columns():
    image = FetchResult(key=CLAIMED, url=CLAIMED.url, ok=True, image_bytes=b"jpeg", width=10, height=20)
    good = ImageAnalysis(text="a cat", analysis={"caption": "a cat"}, parse_ok=True, model="m", prompt_version="v",
                         prompt_tokens=5, generated_tokens=3, error=None, batch_size=1,
                         timings={"inference_ms": 7.0})  # fmt: skip
    outcome = outcomes.analysed(CLAIMED, image, good, "gpu1", policy(), NOW)
    assert outcome.state == "done" and outcome.attempts == 2
    assert outcome.result["gpu"] == "gpu1" and outcome.result["inference_ms"] == 7.0 and outcome.result["height"] == 20


def test_a_gpu_outage_returns_the_url_uncharged_and_claimable_at_once():
    outcome = outcomes.gpu_unavailable(CLAIMED, tries=50)
    assert outcome.state == "pending" and outcome.attempts == CLAIMED.attempts and outcome.next_attempt_at is None
