"""Address safety: which IP addresses an untrusted URL may make us connect to.

Refused by default: private, loopback, link-local (cloud metadata 169.254.169.254 included),
carrier-grade NAT, multicast, reserved, documentation and unspecified ranges, in IPv4 and IPv6,
and IPv6 forms that embed an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, NAT64) are judged
by the IPv4 address inside. ``allowed_networks`` exempts chosen networks (tests allow 127.0.0.0/8).

Hosts written as numbers are parsed the way the C library's ``inet_aton`` reads them, so
``2130706433``, ``0x7f.1`` and ``0177.0.0.1`` are all recognised as 127.0.0.1 and judged as such.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Explicit list (readable, and stricter than relying on ``is_global`` alone, whose coverage changes
# between Python versions). ``is_global`` is still required on top as a second net.
BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",  # "this network", 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT (also Alibaba metadata 100.100.100.200)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata 169.254.169.254
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/128",  # unspecified
        "::1/128",  # loopback
        "::/96",  # deprecated IPv4-compatible
        "100::/64",  # discard
        "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, ...)
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local (AWS metadata fd00:ec2::254 included)
        "fe80::/10",  # link-local
        "fec0::/10",  # deprecated site-local
        "ff00::/8",  # multicast
    )
)

_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")


def parse_allowed_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def host_name_problem(host: str) -> str | None:
    """Why a (non-IP) host name can never resolve, or None: DNS caps labels at 63 octets and the
    name at 253 (RFC 1035). Such a URL is invalid for good, not a DNS failure worth retrying."""
    name = host.rstrip(".")
    if len(name) > 253:
        return f"host name of {len(name)} characters (DNS allows 253)"
    longest = max((len(label) for label in name.split(".")), default=0)
    if longest > 63:
        return f"host name label of {longest} characters (DNS allows 63)"
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a URL host denotes when it is written as an IP, in any spelling; else None."""
    candidate = host.strip()
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
    candidate = candidate.rstrip(".") if _NUMERIC_HOST.fullmatch(candidate) else candidate
    # an IPv6 zone id ("fe80::1%eth0", percent-encoded in URLs) does not change the address
    candidate = candidate.split("%", 1)[0]
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(candidate) and candidate[0].isdigit():
        try:
            # decimal, octal, hex and shortened dotted forms, exactly as the resolver would read them
            return ipaddress.IPv4Address(socket.inet_aton(candidate))
        except OSError:
            return None
    return None


def connectable(address: IPAddress) -> IPAddress:
    """The address to actually connect to: an IPv4-mapped IPv6 address is the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def blocked_reason(address: IPAddress, allowed: tuple[IPNetwork, ...] = ()) -> str | None:
    """Why connecting to ``address`` is refused, or None when it is allowed."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = blocked_reason(embedded, allowed)
            return f"{address} embeds {embedded}: {reason}" if reason else None
        if address.scope_id:
            address = ipaddress.IPv6Address(address.compressed.split("%", 1)[0])
    if any(address.version == net.version and address in net for net in allowed):
        return None
    for network in BLOCKED_NETWORKS:
        if address.version == network.version and address in network:
            return f"{address} is in blocked network {network}"
    if not address.is_global or address.is_multicast or address.is_reserved:
        return f"{address} is not a public unicast address"
    return None
