"""Polite by default: robots.txt honoured for our token, a per-host request rate, a contact URL."""

from __future__ import annotations

import asyncio

from imgpipe_dagster.fetch import ErrorClass, FetchSettings, ImageFetcher
from imgpipe_dagster.fetch.settings import ROBOTS_TOKEN
from imgpipe_dagster_tests.fetch.hosts_support import classes, fetch_all
from imgpipe_dagster_tests.web.image_server import ImageServer, fault_test_settings, loopback_address

# other crawlers may take everything; ours may not take /private/
ROBOTS_FOR_US = f"User-agent: {ROBOTS_TOKEN}\nDisallow: /private/\n\nUser-agent: *\nAllow: /\n"


def run(settings: FetchSettings, items):
    async def scenario():
        async with ImageFetcher(settings) as fetcher:
            return await fetch_all(fetcher, items)

    return {result.key: result for result in asyncio.run(scenario())}


def test_a_disallowed_url_is_never_requested_and_ends_robots_disallowed() -> None:
    with ImageServer(loopback_address(60), robots_txt=ROBOTS_FOR_US) as server:
        items = [(f"open-{i}", server.image_url("rocket", "jpg", width=64, n=i)) for i in range(5)]
        items += [(f"private-{i}", server.url(f"/private/img/rocket.jpg?w=64&n={i}")) for i in range(5)]
        results = run(fault_test_settings(), items)
        paths = [path for _t, path in server.request_log]
    assert all(results[f"open-{i}"].ok for i in range(5))
    private = [results[f"private-{i}"].error for i in range(5)]
    assert {error.error_class for error in private} == {ErrorClass.ROBOTS_DISALLOWED}
    assert not any(error.retryable for error in private)
    assert not [path for path in paths if path.startswith("/private/")]  # the server's log proves it
    assert paths.count("/robots.txt") == 1  # fetched once, cached for the host


def test_the_operator_switch_ignores_robots_txt_for_permitted_corpora() -> None:
    with ImageServer(loopback_address(61), robots_txt="User-agent: *\nDisallow: /\n") as server:
        items = [(i, server.url(f"/private/img/rocket.jpg?w=64&n={i}")) for i in range(3)]
        results = run(fault_test_settings(obey_robots_txt=False), items)
        paths = [path for _t, path in server.request_log]
    assert all(result.ok for result in results.values())
    assert "/robots.txt" not in paths


def test_a_missing_robots_txt_allows_everything() -> None:
    with ImageServer(loopback_address(62), robots_txt=None) as server:
        results = run(fault_test_settings(), [(1, server.url("/private/img/rocket.jpg?w=64"))])
    assert results[1].ok, results[1].error


def test_an_unavailable_robots_txt_fetches_nothing_and_counts_against_the_host() -> None:
    with ImageServer(loopback_address(66), robots_status=503) as server:
        items = [(i, server.image_url("rocket", "jpg", width=64, n=i)) for i in range(10)]
        results = run(fault_test_settings(host_failures_to_open=3), items)
        paths = [path for _t, path in server.request_log]
    # nothing is fetched from a host whose robots.txt is unavailable (RFC 9309: assume disallow); each
    # URL that asked spends an attempt (HTTP_5XX), and after three the host's breaker defers the rest
    assert classes(results.values()) == {"http_5xx": 3, "host_deferred": 7}
    assert paths == ["/robots.txt"] * 3
    assert all("robots.txt" in r.error.message for r in results.values() if r.error.error_class is ErrorClass.HTTP_5XX)


def test_only_the_first_robots_max_bytes_are_read_and_their_rules_hold() -> None:
    comment = "# " + "x" * 78 + "\n"
    huge = f"User-agent: *\nDisallow: /private/\n{comment * 20_000}Disallow: /img/\n"  # 1.6 MB
    with ImageServer(loopback_address(63), robots_txt=huge) as server:
        results = run(
            fault_test_settings(robots_max_bytes=64 * 1024),
            [("private", server.url("/private/img/rocket.jpg?w=64")), ("img", server.image_url("rocket", "jpg"))],
        )
    assert results["private"].error.error_class is ErrorClass.ROBOTS_DISALLOWED
    assert results["img"].ok  # the rule past the cap was never read


def test_requests_to_one_host_keep_to_its_rate() -> None:
    rate, burst, count = 5.0, 4, 16
    settings = fault_test_settings(per_host_requests_per_s=rate, per_host_limit=burst, prefetch_concurrent_downloads=burst)
    with ImageServer(loopback_address(64)) as server:
        items = [(i, server.image_url("rocket", "jpg", width=64, n=i)) for i in range(count)]
        results = run(settings, items)
        times = [t for t, path in server.request_log if path.startswith("/img/")]
    assert classes(results.values()) == {"ok": count}
    # after the burst, each request waits for a token: the span is at least (count - burst) / rate
    # (a lower bound on what the fetcher may do; a slow machine only spreads requests further)
    assert times[-1] - times[0] >= (count - burst - 1) / rate


def test_the_user_agent_carries_the_operators_contact_url() -> None:
    settings = fault_test_settings(contact_url="https://example.org/imgpipe-crawler")
    with ImageServer(loopback_address(65)) as server:
        results = run(settings, [(1, server.image_url("rocket", "jpg", width=64))])
        agents = set(server.user_agents)
    assert results[1].ok
    assert agents == {f"{settings.user_agent} (+https://example.org/imgpipe-crawler)"}
    assert settings.user_agent.lower().startswith(ROBOTS_TOKEN)  # robots.txt groups for us match it
