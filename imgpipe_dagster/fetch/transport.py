"""An httpx transport whose every TCP connection goes to an address our resolver checked.

httpcore asks its network backend for ``connect_tcp(host, port)``; our backend resolves ``host``
through :class:`SafeResolver` (cache + address-safety check) and connects to the checked IP. The
request URL is untouched, so the Host header and TLS SNI/certificate checks still use the hostname.
No proxy is ever used (the transport is built with ``trust_env=False`` and no proxy), so an
``HTTP_PROXY`` in the environment cannot route around the check.
"""

from __future__ import annotations

import select
import socket
import ssl
import typing

import httpcore
import httpx
from httpcore._backends.auto import AutoBackend

from imgpipe_dagster.fetch.errors import ErrorClass, FetchError
from imgpipe_dagster.fetch.resolver import SafeResolver

# try at most this many of a host's safe addresses before giving up on connecting
_MAX_ADDRESSES_TRIED = 3


def _socket_readable(sock: socket.socket | None) -> bool:
    """True when a read would not block (data, or the peer closed): an idle pooled connection is dead."""
    if sock is None or sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class _PooledStream(httpcore.AsyncNetworkStream):
    """Delegates to the real stream, answering the pool's idle check from a socket looked up once.

    httpcore asks every idle connection "is_readable" each time it assigns a request; anyio answers
    by rebuilding a dict of socket attributes (with a getpeername call) per ask, which profiling
    showed as the largest CPU cost of the download loop with a warm pool.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _PooledStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            return _socket_readable(self._socket)
        return self._inner.get_extra_info(info)


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
                stream = await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
                return _PooledStream(stream)
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
