"""An httpx transport whose every TCP connection goes to an address our resolver checked.

httpcore asks its network backend for ``connect_tcp(host, port)``; our backend resolves ``host``
through :class:`SafeResolver` (cache + address-safety check) and connects to the checked IP. The
request URL is untouched, so the Host header and TLS SNI/certificate checks still use the hostname.
No proxy is ever used (the transport is built with ``trust_env=False`` and no proxy), so an
``HTTP_PROXY`` in the environment cannot route around the check.

Connections are pooled per origin (:class:`PoolPerOrigin`): httpcore's pool looks at every one of its
connections, and for each idle one counts them all again, whenever a request starts or ends, so one
pool holding the hundreds of connections of hundreds of downloads in flight spent most of the event
loop's time there (measured on bench/web.py's realistic web: the loop lagged by over a second).
"""

from __future__ import annotations

import select
import socket
import ssl
import typing
from collections import OrderedDict
from collections.abc import Callable

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


class PoolPerOrigin:
    """One small httpcore pool per origin (scheme, host, port), so the pool's bookkeeping on every
    request costs the connections of one host, not of every download in flight.

    Pools of at most ``origins_kept`` origins stay open: past that, the least recently used pools
    with nothing in flight are closed (their idle keep-alive connections with them), so millions of
    hosts do not pile up open sockets.
    """

    def __init__(self, make_pool: Callable[[], httpcore.AsyncConnectionPool], origins_kept: int) -> None:
        self._make_pool = make_pool
        self._origins_kept = max(1, origins_kept)
        self._pools: OrderedDict[tuple[bytes, bytes, int | None], httpcore.AsyncConnectionPool] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pools)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        origin = (request.url.scheme, request.url.host, request.url.port)
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = self._make_pool()
            if len(self._pools) > self._origins_kept:
                await self._close_idle_pools()
        else:
            self._pools.move_to_end(origin)
        return await pool.handle_async_request(request)

    async def _close_idle_pools(self) -> None:
        """Close least recently used pools with nothing in flight until the count is back in bounds
        (pools busy now stay, however many)."""
        excess = len(self._pools) - self._origins_kept
        idle = []
        for origin, pool in self._pools.items():
            if len(idle) >= excess:
                break
            # a connection that is connecting or carrying a request is not idle
            if all(connection.is_idle() or connection.is_closed() for connection in pool.connections):
                idle.append(origin)
        for origin in idle:
            await self._pools.pop(origin).aclose()

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.aclose()

    async def __aenter__(self) -> PoolPerOrigin:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class SafeTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` with :class:`SafeNetworkBackend` under per-origin connection pools.

    ``limits.max_connections`` bounds the connections to one origin (the per-host gate bounds them
    far lower); ``limits.max_keepalive_connections`` the idle ones kept per origin; ``origins_kept``
    the origins whose pools stay open while idle.
    """

    def __init__(self, resolver: SafeResolver, *, limits: httpx.Limits, origins_kept: int = 1) -> None:
        super().__init__(limits=limits, trust_env=False, proxy=None)
        # httpx does not expose httpcore's network_backend, so the pool it built is replaced by
        # equivalent ones (same limits and TLS context) that connect through our backend.
        ssl_context = httpx.create_ssl_context(trust_env=False)
        backend = SafeNetworkBackend(resolver)

        def make_pool() -> httpcore.AsyncConnectionPool:
            return httpcore.AsyncConnectionPool(
                ssl_context=ssl_context,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                http1=True,
                http2=False,
                network_backend=backend,
            )

        self._pool = PoolPerOrigin(make_pool, origins_kept)
