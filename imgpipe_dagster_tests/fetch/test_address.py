"""Address safety as a pure function: which addresses are refused, in every spelling."""

from __future__ import annotations

import ipaddress

import pytest

from imgpipe_dagster.fetch.address import blocked_reason, parse_allowed_networks, parse_ip_literal

# every entry is refused with the default (empty) allow-list
BLOCKED_ADDRESSES = [
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "169.254.169.254",  # cloud metadata
    "169.254.0.1",
    "100.64.0.1",  # carrier-grade NAT
    "100.100.100.200",  # Alibaba metadata
    "192.0.2.1",
    "198.18.0.1",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "fc00::1",
    "fd00:ec2::254",  # AWS IPv6 metadata
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # deprecated IPv4-compatible
    "2002:7f00:1::",  # 6to4 wrapping 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 wrapping 169.254.169.254
    "64:ff9b::a9fe:a9fe",  # NAT64 wrapping 169.254.169.254
    "64:ff9b::a00:1",  # NAT64 wrapping 10.0.0.1
]

PUBLIC_ADDRESSES = [
    "8.8.8.8",
    "93.184.216.34",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "2002:808:808::1",
]

# host spellings the C resolver accepts for IPv4, and what they mean
SPELLINGS = {
    "2130706433": "127.0.0.1",  # decimal
    "0177.0.0.1": "127.0.0.1",  # octal
    "0177.0.0.01": "127.0.0.1",
    "0x7f.0.0.1": "127.0.0.1",  # hex per part
    "0x7f000001": "127.0.0.1",  # hex whole
    "0X7F.1": "127.0.0.1",
    "127.1": "127.0.0.1",  # shortened
    "127.0.1": "127.0.0.1",
    "167772161": "10.0.0.1",
    "012.0.0.1": "10.0.0.1",
    "0xa.1": "10.0.0.1",
    "2852039166": "169.254.169.254",
    "0251.0376.0251.0376": "169.254.169.254",
    "0xa9fea9fe": "169.254.169.254",
    "0xa9.0xfe.0xa9.0xfe": "169.254.169.254",
    "[::ffff:7f00:1]": "::ffff:7f00:1",
    "[::1]": "::1",
    "fe80::1%25eth0": "fe80::1",
    "127.0.0.1.": "127.0.0.1",
}


@pytest.mark.parametrize("address", BLOCKED_ADDRESSES)
def test_non_public_addresses_are_blocked_by_default(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_are_allowed(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("spelling", "meaning"), sorted(SPELLINGS.items()))
def test_numeric_host_spellings_are_read_as_the_resolver_reads_them(spelling: str, meaning: str) -> None:
    assert parse_ip_literal(spelling) == ipaddress.ip_address(meaning)


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_of_a_blocked_address_is_blocked(spelling: str) -> None:
    parsed = parse_ip_literal(spelling)
    assert parsed is not None
    assert blocked_reason(parsed) is not None


@pytest.mark.parametrize(
    "host", ["example.com", "deadbeef", "cafe.example", "localhost", "1.2.3.4.nip.io", ""]
)
def test_hostnames_are_not_mistaken_for_addresses(host: str) -> None:
    assert parse_ip_literal(host) is None


def test_allow_list_exempts_exactly_its_networks_including_mapped_forms() -> None:
    allowed = parse_allowed_networks(["127.0.0.0/8"])
    assert blocked_reason(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert blocked_reason(ipaddress.ip_address("::ffff:127.0.0.1"), allowed) is None
    assert blocked_reason(ipaddress.ip_address("10.0.0.1"), allowed) is not None
    assert blocked_reason(ipaddress.ip_address("::1"), allowed) is not None
    assert blocked_reason(ipaddress.ip_address("169.254.169.254"), allowed) is not None
