"""The one error taxonomy of the fetch stage.

Every per-URL failure ends in exactly one :class:`ErrorClass`. The value is a stable lower_snake
string (stored in PostgreSQL as text), and ``retryable`` tells the caller's retry policy whether
trying the same URL again later can succeed. HOST_DEFERRED is neither a success nor a failure of the
URL: it goes back to the pool until ``retry_after`` has passed, without spending an attempt. The fetch stage itself never retries or sleeps.
"""

from __future__ import annotations

from enum import Enum


class ErrorClass(str, Enum):
    # name resolution failed or timed out (often transient: resolver hiccup, NXDOMAIN caching)
    DNS_FAILURE = "dns_failure"
    # TCP (or TLS) handshake did not finish within the connect timeout
    CONNECT_TIMEOUT = "connect_timeout"
    # the peer refused the connection (nothing listening, host down)
    CONNECT_REFUSED = "connect_refused"
    # no byte arrived within the read timeout (slow headers, stalled body)
    READ_TIMEOUT = "read_timeout"
    # the whole download (redirects and body included) ran past its total deadline
    DEADLINE = "deadline"
    # the request was sent but no response (headers) came within the time-to-first-byte limit
    TTFB_TIMEOUT = "ttfb_timeout"
    # the body arrived below the minimum transfer rate once its grace period had passed (a trickle)
    TOO_SLOW = "too_slow"
    # the connection was reset or closed before the full body arrived
    RESET = "reset"
    HTTP_404 = "http_404"
    HTTP_410 = "http_410"
    # any other 4xx (and unusable 3xx) answer
    HTTP_4XX = "http_4xx"
    HTTP_429 = "http_429"
    HTTP_5XX = "http_5xx"
    # body (declared or received) larger than the byte cap, or an image with too many pixels
    TOO_LARGE = "too_large"
    # the bytes are not an image format we accept (e.g. an HTML page sent as image/jpeg)
    NOT_AN_IMAGE = "not_an_image"
    # an image format we accept, but truncated or corrupt
    UNDECODABLE = "undecodable"
    # tiny input that expands enormously: Content-Encoding bombs and pixel bombs
    DECOMPRESSION_BOMB = "decompression_bomb"
    # the host is, resolves to, or redirects to a private/loopback/link-local/metadata address
    BLOCKED_ADDRESS = "blocked_address"
    # the server asked AI systems not to use the image (X-Robots-Tag: noai / noimageai)
    OPTED_OUT = "opted_out"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    # not an absolute http(s) URL with a host we can parse
    INVALID_URL = "invalid_url"
    # TLS handshake or certificate failure (a misconfigured site stays misconfigured)
    TLS_ERROR = "tls_error"
    # the peer spoke malformed HTTP
    PROTOCOL_ERROR = "protocol_error"
    # robots.txt of the host disallows the URL for our User-Agent token; never requested
    ROBOTS_DISALLOWED = "robots_disallowed"
    # not the URL's fault, no request made: the host's breaker is open, or the host asked us to slow
    # down (429/503), or its queue is too long; ``FetchError.retry_after`` says when to try again
    HOST_DEFERRED = "host_deferred"
    # the host stayed dead through every probe of its breaker; failed without another request
    HOST_UNREACHABLE = "host_unreachable"
    # a bug in our own code path; reported, never raised, so one URL cannot stop a run
    INTERNAL_ERROR = "internal_error"

    @property
    def retryable(self) -> bool:
        """True when the same URL may succeed on a later attempt."""
        return self in _RETRYABLE

    @property
    def spends_attempt(self) -> bool:
        """False for HOST_DEFERRED: the URL was not tried, so no attempt (and no retry) is spent."""
        return self is not ErrorClass.HOST_DEFERRED

    def __str__(self) -> str:
        return self.value


_RETRYABLE = frozenset(
    {
        ErrorClass.DNS_FAILURE,
        ErrorClass.CONNECT_TIMEOUT,
        ErrorClass.CONNECT_REFUSED,
        ErrorClass.READ_TIMEOUT,
        ErrorClass.DEADLINE,
        ErrorClass.TTFB_TIMEOUT,
        ErrorClass.TOO_SLOW,
        ErrorClass.HOST_DEFERRED,  # retryable by nature; the caller should not count it as an attempt
        ErrorClass.RESET,
        ErrorClass.HTTP_429,
        ErrorClass.HTTP_5XX,
    }
)


class FetchError(Exception):
    """A classified per-URL failure; ``FetchResult.error`` carries one, ``fetch`` never raises it."""

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{error_class.value}: {message}")
        self.error_class = error_class
        self.message = message
        # the HTTP status of the last response seen, when there was one
        self.http_status = http_status
        # seconds the server asked us to wait (Retry-After on 429/503), for the caller's retry policy
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.error_class.retryable

    def __repr__(self) -> str:
        return (
            f"FetchError({self.error_class.value!r}, {self.message!r}, "
            f"http_status={self.http_status!r}, retry_after={self.retry_after!r})"
        )

    def __reduce__(self):  # keep it picklable across process pools despite keyword-only fields
        return (_rebuild_fetch_error, (self.error_class, self.message, self.http_status, self.retry_after))


def _rebuild_fetch_error(
    error_class: ErrorClass, message: str, http_status: int | None, retry_after: float | None
) -> FetchError:
    return FetchError(error_class, message, http_status=http_status, retry_after=retry_after)
