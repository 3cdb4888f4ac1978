"""An httpx transport whose every TCP connection goes to an address our resolver checked.

httpcore asks its network backend for ``connect_tcp(host, port)``; our backend resolves ``host``
through :class:`SafeResolver` (cache + address-safety check) and connects to the checked IP. The
request URL is untouched, so the Host header and TLS SNI/certificate checks still use the hostname.
No proxy is ever used (the transport is built with ``trust_env=False`` and no proxy), so an
``HTTP_PROXY`` in the environment cannot route around the check.
"""

from __future__ import annotations

import typing

import httpcore
import httpx
from httpcore._backends.auto import AutoBackend

from imgpipe_dagster.fetch.errors import ErrorClass, FetchError
from imgpipe_dagster.fetch.resolver import SafeResolver

# try at most this many of a host's safe addresses before giving up on connecting
_MAX_ADDRESSES_TRIED = 3


class SafeNetworkBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, resolver: SafeResolver, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._resolver = resolver
        self._inner = inner or AutoBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._resolver.resolve(host)
        last_error: Exception | None = None
        for address in addresses[:_MAX_ADDRESSES_TRIED]:
            self._resolver.check_address(address)  # cheap, and keeps this method safe on its own
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise FetchError(ErrorClass.BLOCKED_ADDRESS, "unix sockets are never used for image downloads")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class SafeTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` with :class:`SafeNetworkBackend` under its connection pool."""

    def __init__(self, resolver: SafeResolver, *, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False, proxy=None)
        # httpx does not expose httpcore's network_backend, so the pool it built is replaced by an
        # equivalent one (same limits and TLS context) that connects through our backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=SafeNetworkBackend(resolver),
        )
