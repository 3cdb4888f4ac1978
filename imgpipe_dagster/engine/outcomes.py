"""The outcome classifier: what becomes of a leased URL, as functions of what the fetch and the GPU
returned. No I/O and no clock of their own (``now`` is an argument): the runner calls them and hands
the outcome to the writer.

Next states (store.work.UrlOutcome.state):
* ``done`` / ``failed_permanent``: final, with a result row;
* ``failed_retryable``: tried again when ``next_attempt_at`` comes (one retry of the URL's budget spent);
* ``pending``: back to the pool without spending a retry: a GPU outage (claimable at once), or a host
  that is not worth trying before ``next_attempt_at`` (HOST_DEFERRED: the host's fault, not the URL's).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from imgpipe_dagster.fetch import FetchResult
from imgpipe_dagster.resilience.retry import RetryPolicy
from imgpipe_dagster.store.work import ClaimedUrl, UrlOutcome

# ErrorClass value of a download the fetcher did not attempt because the host's breaker is open or
# the host asked us to slow down (fetch.errors.ErrorClass.HOST_DEFERRED).
HOST_DEFERRED = "host_deferred"
# error_class of URLs returned because no GPU server could take them
GPU_UNAVAILABLE = "gpu_unavailable"
# error_class of an image the GPU server could not analyse
INFERENCE_ERROR = "inference_error"


def fetch_columns(result: FetchResult) -> dict:
    """The url_analysis_results columns a download fills."""
    return {
        "http_status": result.http_status,
        "content_type": result.content_type,
        "bytes": result.bytes,
        "width": result.width,
        "height": result.height,
        "format": result.format,
        "sha256": result.sha256,
        "phash": result.phash,
        "download_ms": result.download_ms,
    }


def fetch_failure(
    claimed: ClaimedUrl, result: FetchResult, retry: RetryPolicy, now: datetime, *, deferral_s: float
) -> UrlOutcome:
    """A failed download: deferred (host's fault, no retry spent), retryable with a backoff, or final.
    ``deferral_s`` is how long a deferred URL waits when the fetcher named no time."""
    error = result.error
    error_class = error.error_class.value if error else "unknown"
    message = error.message if error else "fetch failed"
    if error_class == HOST_DEFERRED:
        wait = error.retry_after if error and error.retry_after is not None else deferral_s
        return UrlOutcome(claimed.url_hash, claimed.url, claimed.shard_id, "pending", claimed.attempts,
                          error_class, message, next_attempt_at=now + timedelta(seconds=max(wait, 0.0)))  # fmt: skip
    attempt = claimed.attempts + 1
    outcome = UrlOutcome(claimed.url_hash, claimed.url, claimed.shard_id, "failed_permanent", attempt,
                         error_class, message, result=fetch_columns(result))  # fmt: skip
    retryable = bool(error and error.error_class.retryable)
    if retryable and attempt <= retry.settings.retry_attempts:
        if retry.should_retry(True, attempt):
            delay = retry.delay(attempt, error.retry_after if error else None)
        else:  # the retry budget is spent: defer instead of adding load now
            delay = retry.settings.max_backoff_s
        outcome.state = "failed_retryable"
        outcome.next_attempt_at = now + timedelta(seconds=delay)
    return outcome


def analysed(
    claimed: ClaimedUrl, result: FetchResult, analysis, gpu_name: str, retry: RetryPolicy, now: datetime
) -> UrlOutcome:
    """An image the GPU tier answered for: done, or an inference failure of that one image."""
    if not analysis.ok:
        return inference_failure(claimed, result, analysis.error or "inference failed", retry, now)
    columns = fetch_columns(result) | {
        "model_text": analysis.text,
        "analysis": analysis.analysis,
        "parse_ok": analysis.parse_ok,
        "model": analysis.model,
        "prompt_version": analysis.prompt_version,
        "prompt_tokens": analysis.prompt_tokens,
        "generated_tokens": analysis.generated_tokens,
        "inference_ms": analysis.timings.get("inference_ms"),
        "gpu": gpu_name,
    }
    return UrlOutcome(claimed.url_hash, claimed.url, claimed.shard_id, "done", claimed.attempts + 1, result=columns)


def inference_failure(
    claimed: ClaimedUrl, result: FetchResult, message: str, retry: RetryPolicy, now: datetime
) -> UrlOutcome:
    """The GPU server answered but could not analyse the image (or rejected the request): retried
    under the inference retry settings, then final."""
    attempt = claimed.attempts + 1
    retryable = attempt <= retry.settings.retry_attempts
    outcome = UrlOutcome(claimed.url_hash, claimed.url, claimed.shard_id,
                         "failed_retryable" if retryable else "failed_permanent", attempt, INFERENCE_ERROR,
                         message, result=fetch_columns(result))  # fmt: skip
    if retryable:
        outcome.next_attempt_at = now + timedelta(seconds=retry.delay(attempt))
    return outcome


def gpu_unavailable(claimed: ClaimedUrl, tries: int) -> UrlOutcome:
    """No GPU server took the request: back to pending, claimable at once, no retry spent."""
    return UrlOutcome(claimed.url_hash, claimed.url, claimed.shard_id, "pending", claimed.attempts, GPU_UNAVAILABLE,
                      f"GPU servers unavailable after {tries} tries; returned without spending a retry")  # fmt: skip
