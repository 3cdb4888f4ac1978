"""The error taxonomy: stable values, retryable vs permanent, and what FetchError carries."""

from __future__ import annotations

import pickle

import pytest

from imgpipe_dagster.fetch.errors import ErrorClass, FetchError

REQUIRED = {
    "DNS_FAILURE": True,
    "CONNECT_TIMEOUT": True,
    "READ_TIMEOUT": True,
    "DEADLINE": True,
    "RESET": True,
    "HTTP_429": True,
    "HTTP_5XX": True,
    "HTTP_404": False,
    "HTTP_410": False,
    "HTTP_4XX": False,
    "TOO_LARGE": False,
    "NOT_AN_IMAGE": False,
    "UNDECODABLE": False,
    "DECOMPRESSION_BOMB": False,
    "BLOCKED_ADDRESS": False,
    "OPTED_OUT": False,
    "TOO_MANY_REDIRECTS": False,
    "INVALID_URL": False,
    "TTFB_TIMEOUT": True,
    "TOO_SLOW": True,
    "HOST_DEFERRED": True,
    "ROBOTS_DISALLOWED": False,
    "HOST_UNREACHABLE": False,
}


def test_only_a_deferral_spends_no_attempt() -> None:
    assert [c for c in ErrorClass if not c.spends_attempt] == [ErrorClass.HOST_DEFERRED]


@pytest.mark.parametrize(("name", "retryable"), sorted(REQUIRED.items()))
def test_each_required_class_exists_with_its_retry_verdict(name: str, retryable: bool) -> None:
    error_class = ErrorClass[name]
    assert error_class.retryable is retryable
    assert error_class.value == name.lower()


def test_values_are_lower_snake_text_that_round_trips() -> None:
    for error_class in ErrorClass:
        assert error_class.value == error_class.value.lower()
        assert " " not in error_class.value
        assert ErrorClass(error_class.value) is error_class
        assert str(error_class) == error_class.value


def test_fetch_error_carries_class_message_status_and_retry_after() -> None:
    error = FetchError(ErrorClass.HTTP_429, "HTTP 429", http_status=429, retry_after=7.0)
    assert (error.error_class, error.message, error.http_status, error.retry_after) == (
        ErrorClass.HTTP_429,
        "HTTP 429",
        429,
        7.0,
    )
    assert error.retryable
    assert "http_429" in str(error)


def test_fetch_error_survives_pickling_for_process_pools() -> None:
    error = FetchError(ErrorClass.HTTP_5XX, "HTTP 503", http_status=503, retry_after=3.0)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.error_class, copy.message, copy.http_status, copy.retry_after) == (
        ErrorClass.HTTP_5XX,
        "HTTP 503",
        503,
        3.0,
    )
