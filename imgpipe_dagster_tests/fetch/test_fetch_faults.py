"""Every fault the test image server offers ends in its error class, with nothing half-delivered."""

from __future__ import annotations

import asyncio

import pytest

from imgpipe_dagster.fetch import ErrorClass, FetchResult, ImageFetcher
from imgpipe_dagster_tests.web.image_server import FAULT_KINDS, ImageServer, fault_test_settings

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

# classes that a remote server or URL can provoke; the rest (TLS, protocol, internal) need other setups
CLASSES_A_SERVER_CAN_PROVOKE = set(ErrorClass) - {
    ErrorClass.TLS_ERROR,
    ErrorClass.PROTOCOL_ERROR,
    ErrorClass.INTERNAL_ERROR,
    # a host's history decides these, not one URL: see test_hosts.py
    ErrorClass.HOST_DEFERRED,
    ErrorClass.HOST_UNREACHABLE,
}


def fetch_one(url: str, **overrides) -> FetchResult:
    async def scenario() -> FetchResult:
        async with ImageFetcher(fault_test_settings(**overrides)) as fetcher:
            return await fetcher.fetch(url, key="k")

    return asyncio.run(scenario())


def test_the_fault_catalogue_covers_every_class(warm_image_server: ImageServer) -> None:
    covered = {case.expected for case in warm_image_server.fault_cases()}
    assert covered == CLASSES_A_SERVER_CAN_PROVOKE
    assert [case.kind for case in warm_image_server.fault_cases()] == list(FAULT_KINDS)


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_ends_in_its_error_class(warm_image_server: ImageServer, kind: str) -> None:
    case = next(c for c in warm_image_server.fault_cases() if c.kind == kind)
    result = fetch_one(case.url)
    assert not result.ok
    assert result.error is not None
    assert result.error.error_class is case.expected, result.error
    assert result.image_bytes is None
    assert result.key == "k" and result.url == case.url


def test_retry_after_is_reported_for_the_caller_to_honour(warm_image_server: ImageServer) -> None:
    too_many = fetch_one(warm_image_server.url("/fault/status/429?retry_after=7"))
    unavailable = fetch_one(warm_image_server.url("/fault/status/503?retry_after=3"))
    assert (too_many.error.error_class, too_many.http_status, too_many.error.retry_after) == (
        ErrorClass.HTTP_429,
        429,
        7.0,
    )
    assert (unavailable.error.error_class, unavailable.http_status, unavailable.error.retry_after) == (
        ErrorClass.HTTP_5XX,
        503,
        3.0,
    )
    assert too_many.error.retryable and unavailable.error.retryable


def test_the_ai_opt_out_can_be_switched_off(warm_image_server: ImageServer) -> None:
    result = fetch_one(warm_image_server.url("/fault/noai"), honour_noai_opt_out=False)
    assert result.ok, result.error


def test_the_100_megapixel_photo_is_refused_from_its_header_not_its_size(
    warm_image_server: ImageServer,
) -> None:
    result = fetch_one(warm_image_server.url("/fault/huge-100mp"))
    assert result.error.error_class is ErrorClass.TOO_LARGE
    assert "100,000,000 pixels" in result.error.message
    # it was downloaded whole (under the byte cap) and refused before any pixel was decoded
    assert result.bytes is not None and result.bytes < fault_test_settings().max_bytes


def test_a_redirect_chain_within_the_limit_is_followed(warm_image_server: ImageServer) -> None:
    result = fetch_one(warm_image_server.url("/fault/redirect-chain?hops=5"))
    assert result.ok, result.error
    assert result.redirects == 5
    assert result.final_url.endswith("/fault/redirect-chain?hops=0")


def test_redirect_limit_is_configurable(warm_image_server: ImageServer) -> None:
    result = fetch_one(warm_image_server.url("/fault/redirect-chain?hops=2"), max_redirects=1)
    assert result.error.error_class is ErrorClass.TOO_MANY_REDIRECTS
