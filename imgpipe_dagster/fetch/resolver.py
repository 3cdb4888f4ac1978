"""DNS resolution with a cache, one lookup per host at a time, and the address-safety check.

Every connection the fetcher opens goes to an address this resolver returned, so the address that
was checked is the address that is connected to (no second resolution inside the HTTP library).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from imgpipe_dagster.fetch.address import (
    IPNetwork,
    blocked_reason,
    connectable,
    parse_allowed_networks,
    parse_ip_literal,
)
from imgpipe_dagster.fetch.errors import ErrorClass, FetchError

# host -> IP address strings, in the resolver's preference order; raises OSError when it fails
Lookup = Callable[[str], Awaitable[Sequence[str]]]

# bounded so a corpus of millions of hosts cannot grow the cache without limit
_MAX_CACHED_HOSTS = 50_000
# failed lookups are remembered for a tenth of the TTL: long enough to not hammer, short enough to heal
_NEGATIVE_TTL_FRACTION = 0.1


async def system_lookup(host: str) -> list[str]:
    """The operating system's resolver (getaddrinfo), run off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class SafeResolver:
    """Resolves hosts to the addresses we may connect to, or raises a classified FetchError."""

    def __init__(
        self,
        *,
        allowed_networks: Sequence[str] = (),
        cache_ttl_s: float = 300.0,
        timeout_s: float = 5.0,
        lookup: Lookup | None = None,
    ) -> None:
        self._allowed: tuple[IPNetwork, ...] = parse_allowed_networks(allowed_networks)
        self._ttl = cache_ttl_s
        self._timeout = timeout_s
        self._lookup = lookup or system_lookup
        # host -> (expiry on time.monotonic(), addresses or the failure to repeat)
        self._cache: OrderedDict[str, tuple[float, list[str] | FetchError]] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[list[str]]] = {}
        self.lookups = 0  # how many times the underlying lookup actually ran (for tests and stats)

    def check_address(self, address: str) -> None:
        """Raise BLOCKED_ADDRESS unless ``address`` (an IP literal) may be connected to."""
        ip = parse_ip_literal(address)
        if ip is None:
            raise FetchError(ErrorClass.INVALID_URL, f"not an IP address: {address!r}")
        reason = blocked_reason(ip, self._allowed)
        if reason:
            raise FetchError(ErrorClass.BLOCKED_ADDRESS, reason)

    async def resolve(self, host: str) -> list[str]:
        """Addresses of ``host`` that pass the safety check (at least one), best first."""
        literal = parse_ip_literal(host)
        if literal is not None:
            reason = blocked_reason(literal, self._allowed)
            if reason:
                raise FetchError(ErrorClass.BLOCKED_ADDRESS, reason)
            return [str(connectable(literal))]
        addresses = await self._cached_lookup(host.lower().rstrip("."))
        safe = [
            str(connectable(parse_ip_literal(a)))
            for a in addresses
            if not blocked_reason(parse_ip_literal(a), self._allowed)
        ]
        if not safe:
            reasons = "; ".join(
                filter(None, (blocked_reason(parse_ip_literal(a), self._allowed) for a in addresses))
            )
            raise FetchError(
                ErrorClass.BLOCKED_ADDRESS, f"{host} resolves only to blocked addresses ({reasons})"
            )
        return safe

    async def _cached_lookup(self, host: str) -> list[str]:
        cached = self._cache.get(host)
        if cached is not None:
            expiry, value = cached
            if expiry > time.monotonic():
                self._cache.move_to_end(host)
                if isinstance(value, FetchError):
                    raise FetchError(value.error_class, value.message)
                return value
            del self._cache[host]
        pending = self._in_flight.get(host)
        if pending is not None:
            # shield: one waiter being cancelled must not cancel the lookup the others wait on
            return list(await asyncio.shield(pending))
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._in_flight[host] = future
        try:
            addresses = await self._lookup_once(host)
        except FetchError as exc:
            self._remember(host, exc, self._ttl * _NEGATIVE_TTL_FRACTION)
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may all have gone
            raise
        except BaseException:  # cancelled: let the waiters see a DNS failure, remember nothing
            future.set_exception(FetchError(ErrorClass.DNS_FAILURE, f"lookup of {host} abandoned"))
            future.exception()
            raise
        finally:
            self._in_flight.pop(host, None)
        self._remember(host, addresses, self._ttl)
        future.set_result(addresses)
        return list(addresses)

    async def _lookup_once(self, host: str) -> list[str]:
        self.lookups += 1
        try:
            async with asyncio.timeout(self._timeout):
                addresses = list(await self._lookup(host))
        except TimeoutError as exc:
            raise FetchError(
                ErrorClass.DNS_FAILURE, f"lookup of {host} timed out after {self._timeout}s"
            ) from exc
        except (OSError, UnicodeError) as exc:
            raise FetchError(ErrorClass.DNS_FAILURE, f"lookup of {host} failed: {exc}") from exc
        valid = [a for a in addresses if parse_ip_literal(a) is not None]
        if not valid:
            raise FetchError(ErrorClass.DNS_FAILURE, f"lookup of {host} returned no address")
        return valid

    def _remember(self, host: str, value: list[str] | FetchError, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[host] = (time.monotonic() + ttl, value)
        self._cache.move_to_end(host)
        while len(self._cache) > _MAX_CACHED_HOSTS:
            self._cache.popitem(last=False)
