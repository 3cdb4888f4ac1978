"""Address safety end to end: blocked hosts are refused directly, via DNS and via redirects, in any
spelling, before any connection is made, and an HTTP proxy in the environment cannot bypass it."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest

from imgpipe_dagster.fetch import ErrorClass, FetchResult, FetchSettings, ImageFetcher
from imgpipe_dagster.settings_map import medium_fetch_settings
from imgpipe_dagster_tests.web.image_server import ImageServer, fault_test_settings

# spellings of loopback that reach the test server when loopback is allowed, and are refused by default
LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "0x7f000001",
    "127.1",
    "[::ffff:127.0.0.1]",
]

# blocked targets that are not loopback (nothing listens there; they must be refused before connecting)
BLOCKED_HOSTS = [
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    "169.254.169.254",
    "0.0.0.0",
    "100.100.100.200",
    "167772161",  # 10.0.0.1, decimal
    "012.0.0.1",  # 10.0.0.1, octal
    "0xa9fea9fe",  # 169.254.169.254, hex
    "0251.0376.0251.0376",  # 169.254.169.254, octal
    "[::1]",
    "[::]",
    "[fc00::1]",
    "[fd00:ec2::254]",
    "[fe80::1]",
    "[::ffff:10.0.0.1]",
    "[::ffff:a9fe:a9fe]",
    "[64:ff9b::a9fe:a9fe]",
]

# hostnames that our test resolver maps to blocked addresses (a DNS answer an attacker controls)
EVIL_DNS = {
    "metadata.evil.test": ["169.254.169.254"],
    "private.evil.test": ["10.0.0.7"],
    "loopback.evil.test": ["127.0.0.1"],
    "ipv6-loopback.evil.test": ["::1"],
    "mapped.evil.test": ["::ffff:127.0.0.1"],
    "ula.evil.test": ["fd12:3456::1"],
    "linklocal.evil.test": ["fe80::abcd"],
    "zero.evil.test": ["0.0.0.0"],
    "photos.example": ["127.0.0.1"],  # a benign name for the allowed-loopback tests
}


async def table_lookup(host: str) -> list[str]:
    if host in EVIL_DNS:
        return EVIL_DNS[host]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def fetch_all(settings: FetchSettings, urls: list[str]) -> list[FetchResult]:
    async def scenario() -> list[FetchResult]:
        async with ImageFetcher(settings, lookup=table_lookup) as fetcher:
            return await asyncio.gather(*(fetcher.fetch(url) for url in urls))

    return asyncio.run(scenario())


def production_settings() -> FetchSettings:
    """Default settings (nothing allowed), with short timeouts so a mistake fails fast."""
    return medium_fetch_settings(prefetch_download_timeout=3.0, connect_timeout_s=1.0, read_timeout_s=1.0)


def marker() -> str:
    return uuid.uuid4().hex


def reached_server(server: ImageServer, token: str) -> bool:
    return any(token in path for _host, path in list(server.recent))


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_loopback_is_refused_by_default_and_never_connects(
    image_server: ImageServer, host: str
) -> None:
    token = marker()
    [result] = fetch_all(
        production_settings(), [f"http://{host}:{image_server.port}/img/rocket.jpg?n={token}"]
    )
    assert result.error is not None and result.error.error_class is ErrorClass.BLOCKED_ADDRESS
    assert not reached_server(image_server, token)


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_the_same_spellings_really_reach_loopback_when_it_is_allowed(
    image_server: ImageServer, host: str
) -> None:
    # the control: proves each spelling above denotes the server, so refusing it is meaningful
    token = marker()
    [result] = fetch_all(
        fault_test_settings(), [f"http://{host}:{image_server.port}/img/rocket.jpg?n={token}"]
    )
    assert result.ok, result.error
    assert reached_server(image_server, token)


@pytest.mark.parametrize("host", BLOCKED_HOSTS)
def test_blocked_addresses_are_refused_directly(host: str) -> None:
    [result] = fetch_all(production_settings(), [f"http://{host}/latest/meta-data/"])
    assert result.error is not None and result.error.error_class is ErrorClass.BLOCKED_ADDRESS, result.error


@pytest.mark.parametrize("hostname", sorted(h for h in EVIL_DNS if h.endswith(".evil.test")))
def test_hostnames_resolving_to_blocked_addresses_are_refused(
    image_server: ImageServer, hostname: str
) -> None:
    token = marker()
    urls = [f"http://{hostname}:{image_server.port}/img/rocket.jpg?n={token}"]
    [result] = fetch_all(production_settings(), urls)
    assert result.error is not None and result.error.error_class is ErrorClass.BLOCKED_ADDRESS
    assert not reached_server(image_server, token)


@pytest.mark.parametrize(
    "target",
    [f"http://{host}/latest/meta-data/" for host in BLOCKED_HOSTS if host not in ("0.0.0.0",)]
    + [
        "http://0.0.0.0:1/",
        "http://metadata.evil.test/computeMetadata/v1/",
        "http://ipv6-loopback.evil.test:1/",
    ],
)
def test_redirects_to_blocked_addresses_are_refused(image_server: ImageServer, target: str) -> None:
    # loopback is allowed so the first hop reaches the server; the redirect target must still be refused
    url = image_server.url(f"/fault/redirect-to?url={target}")
    [result] = fetch_all(fault_test_settings(), [url])
    assert result.error is not None and result.error.error_class is ErrorClass.BLOCKED_ADDRESS, result.error


def test_redirect_chain_ending_on_a_blocked_host_is_refused_at_that_hop(image_server: ImageServer) -> None:
    inner = "http://169.254.169.254/latest/meta-data/iam/"
    middle = image_server.url(f"/fault/redirect-to?url={inner}")
    url = image_server.url(f"/fault/redirect-to?url={middle}")
    [result] = fetch_all(fault_test_settings(), [url])
    assert result.error is not None and result.error.error_class is ErrorClass.BLOCKED_ADDRESS


def test_connection_goes_to_the_checked_address_with_the_host_header_kept(image_server: ImageServer) -> None:
    # "photos.example" exists only in our resolver: the fetch can only succeed if the HTTP layer
    # connected to the address we resolved and checked, rather than resolving the name again
    token = marker()
    url = f"http://photos.example:{image_server.port}/img/rocket.jpg?n={token}"
    [result] = fetch_all(fault_test_settings(), [url])
    assert result.ok, result.error
    assert (f"photos.example:{image_server.port}", f"/img/rocket.jpg?n={token}") in list(image_server.recent)


def test_a_proxy_in_the_environment_cannot_route_around_the_check(
    image_server: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the test server stands in for a proxy that would happily fetch anything it is asked for
    proxy = image_server.base_url
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    token = marker()
    results = fetch_all(
        fault_test_settings(),
        [f"http://10.0.0.1/img/rocket.jpg?n={token}", f"http://metadata.evil.test/img/rocket.jpg?n={token}"],
    )
    assert [r.error.error_class for r in results if r.error] == [ErrorClass.BLOCKED_ADDRESS] * 2
    assert not reached_server(image_server, token)


def test_non_http_schemes_and_hostless_urls_are_invalid() -> None:
    urls = [
        "ftp://example.com/a.jpg",
        "file:///etc/passwd",
        "gopher://127.0.0.1/",
        "http:///a.jpg",
        "not a url",
        "",
        # DNS caps labels at 63 and names at 253 characters: such a host never resolves, retrying is futile
        "http://" + "a" * 64 + ".example.com/a.jpg",
        "http://" + "abcdefgh." * 30 + "com/a.jpg",
    ]
    results = fetch_all(production_settings(), urls)
    assert [r.error.error_class for r in results if r.error] == [ErrorClass.INVALID_URL] * len(urls)
