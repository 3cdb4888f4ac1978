"""The resolver: cache, one lookup per host at a time, classified failures, safe addresses only."""

from __future__ import annotations

import asyncio
import socket

import pytest

from imgpipe_dagster.fetch.errors import ErrorClass, FetchError
from imgpipe_dagster.fetch.resolver import SafeResolver


def table_lookup(table: dict[str, list[str]], calls: list[str] | None = None, delay: float = 0.0):
    async def lookup(host: str) -> list[str]:
        if calls is not None:
            calls.append(host)
        if delay:
            await asyncio.sleep(delay)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return lookup


def test_answers_are_cached_per_host() -> None:
    calls: list[str] = []
    resolver = SafeResolver(lookup=table_lookup({"photos.example": ["93.184.216.34"]}, calls))

    async def scenario() -> None:
        assert await resolver.resolve("photos.example") == ["93.184.216.34"]
        assert await resolver.resolve("PHOTOS.example.") == ["93.184.216.34"]

    asyncio.run(scenario())
    assert calls == ["photos.example"]


def test_concurrent_requests_for_one_host_share_one_lookup() -> None:
    calls: list[str] = []
    resolver = SafeResolver(lookup=table_lookup({"photos.example": ["93.184.216.34"]}, calls, delay=0.05))

    async def scenario() -> list[list[str]]:
        return await asyncio.gather(*(resolver.resolve("photos.example") for _ in range(20)))

    assert all(answer == ["93.184.216.34"] for answer in asyncio.run(scenario()))
    assert calls == ["photos.example"]


def test_failed_lookup_is_a_dns_failure_and_is_remembered_briefly() -> None:
    calls: list[str] = []
    resolver = SafeResolver(lookup=table_lookup({}, calls), cache_ttl_s=300)

    async def scenario() -> list[ErrorClass]:
        classes = []
        for _ in range(2):
            with pytest.raises(FetchError) as caught:
                await resolver.resolve("missing.example")
            classes.append(caught.value.error_class)
        return classes

    assert asyncio.run(scenario()) == [ErrorClass.DNS_FAILURE, ErrorClass.DNS_FAILURE]
    assert calls == ["missing.example"]


def test_a_lookup_that_hangs_ends_as_dns_failure_at_its_timeout() -> None:
    resolver = SafeResolver(lookup=table_lookup({"slow.example": ["93.184.216.34"]}, delay=30), timeout_s=0.2)

    async def scenario() -> FetchError:
        with pytest.raises(FetchError) as caught:
            await resolver.resolve("slow.example")
        return caught.value

    assert asyncio.run(scenario()).error_class is ErrorClass.DNS_FAILURE


def test_only_safe_addresses_are_returned_and_all_blocked_is_refused() -> None:
    table = {
        "mixed.example": ["10.0.0.1", "93.184.216.34", "::ffff:169.254.169.254"],
        "internal.example": ["10.1.2.3", "fd00::5", "::ffff:127.0.0.1"],
    }
    resolver = SafeResolver(lookup=table_lookup(table))

    async def scenario() -> tuple[list[str], FetchError]:
        mixed = await resolver.resolve("mixed.example")
        with pytest.raises(FetchError) as caught:
            await resolver.resolve("internal.example")
        return mixed, caught.value

    mixed, refused = asyncio.run(scenario())
    assert mixed == ["93.184.216.34"]
    assert refused.error_class is ErrorClass.BLOCKED_ADDRESS


def test_ip_literals_skip_the_lookup_but_not_the_check() -> None:
    calls: list[str] = []
    resolver = SafeResolver(lookup=table_lookup({}, calls), allowed_networks=["127.0.0.0/8"])

    async def scenario() -> tuple[list[str], list[str], FetchError]:
        plain = await resolver.resolve("127.0.0.1")
        mapped = await resolver.resolve("::ffff:127.0.0.1")
        with pytest.raises(FetchError) as caught:
            await resolver.resolve("0xa9fea9fe")
        return plain, mapped, caught.value

    plain, mapped, refused = asyncio.run(scenario())
    assert plain == ["127.0.0.1"]
    assert mapped == ["127.0.0.1"]  # connect over IPv4 to the address the mapped form carries
    assert refused.error_class is ErrorClass.BLOCKED_ADDRESS
    assert calls == []
