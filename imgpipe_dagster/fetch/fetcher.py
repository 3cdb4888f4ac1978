"""The image fetcher: bounded, safe downloads on one pooled httpx client, decoded in a thread pool.

``fetch`` turns one URL into one :class:`FetchResult` and never raises for a per-URL failure;
``stream`` runs ``prefetch_concurrent_downloads`` workers over an input of (key, url) pairs and yields
the results in completion order through a queue of ``prefetch_queue_size``. Memory is bounded whatever
the input: each worker holds at most ``max_bytes`` of body (checked on Content-Length, while streaming
and after Content-Encoding), each decode thread at most ``max_image_pixels`` of pixels (checked from
the header before decoding), and queued results hold only the small resized image.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from imgpipe_dagster.fetch.address import connectable, parse_ip_literal
from imgpipe_dagster.fetch.decode import SNIFF_BYTES, decode_image, sniff_format
from imgpipe_dagster.fetch.encoding import ACCEPT_ENCODING, BoundedBodyDecoder
from imgpipe_dagster.fetch.errors import ErrorClass, FetchError
from imgpipe_dagster.fetch.headers import parse_retry_after, robots_opt_out
from imgpipe_dagster.fetch.resolver import Lookup, SafeResolver
from imgpipe_dagster.fetch.settings import FetchSettings
from imgpipe_dagster.fetch.transport import SafeTransport

log = logging.getLogger(__name__)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_ACCEPT = "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5"
# h11's messages for a connection that ended early: the peer went away, which a retry may survive
_EARLY_CLOSE_MARKERS = ("peer closed connection", "server disconnected")


@dataclass
class FetchResult:
    key: Any  # the caller's opaque id for this URL, returned untouched
    url: str  # the URL as given
    ok: bool
    image_bytes: bytes | None = None  # resized, encoded per output_format, ready for the GPU server
    width: int | None = None  # original width (after EXIF orientation)
    height: int | None = None  # original height (after EXIF orientation)
    resized_width: int | None = None
    resized_height: int | None = None
    format: str | None = None  # detected from the bytes (JPEG, PNG, GIF, WEBP, ...), not from headers
    content_type: str | None = None  # as the server declared it
    http_status: int | None = None  # status of the final response
    bytes: int | None = None  # size of the downloaded image file (after Content-Encoding removal)
    sha256: str | None = None  # hex digest of the downloaded image file
    phash: int | None = None  # signed 64-bit perceptual hash (Postgres bigint)
    download_ms: float | None = None  # from the first request to the last body byte, redirects included
    decode_ms: float | None = None  # decode + resize + encode, in the thread pool
    error: FetchError | None = None  # set exactly when ok is False
    final_url: str | None = None  # URL after redirects
    redirects: int = 0  # redirects followed


@dataclass
class _Download:
    final_url: str
    status: int
    content_type: str | None
    body: bytes
    redirects: int


class _HostSlots:
    """At most ``limit`` downloads in flight per host; entries vanish when a host goes idle."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, host: str):
        entry = self._slots.get(host)
        if entry is None:
            entry = self._slots[host] = (asyncio.Semaphore(self._limit), [0])
        semaphore, users = entry
        users[0] += 1
        try:
            async with semaphore:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._slots.pop(host, None)

    def __len__(self) -> int:
        return len(self._slots)


def prepare_url(url: str, resolver: SafeResolver) -> httpx.URL:
    """Validate an untrusted URL: http(s), a host, and no IP literal (in any spelling) that is blocked."""
    if not isinstance(url, str) or not url.strip():
        raise FetchError(ErrorClass.INVALID_URL, f"not a URL: {url!r}")
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise FetchError(ErrorClass.INVALID_URL, f"unparsable URL: {exc}") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise FetchError(ErrorClass.INVALID_URL, f"scheme {parts.scheme!r} is not http or https")
    if not host:
        raise FetchError(ErrorClass.INVALID_URL, "URL has no host")
    literal = parse_ip_literal(host)
    if literal is not None:
        resolver.check_address(str(literal))
        literal = connectable(literal)
        # spell the address canonically so the HTTP layer reads it exactly as we checked it
        canonical = f"[{literal}]" if literal.version == 6 else str(literal)
        netloc = canonical if port is None else f"{canonical}:{port}"
        url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        raise FetchError(ErrorClass.INVALID_URL, f"invalid URL: {exc}") from exc


def _status_error(response: httpx.Response) -> FetchError | None:
    status = response.status_code
    if 200 <= status < 300:
        return None
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 404:
        error_class = ErrorClass.HTTP_404
    elif status == 410:
        error_class = ErrorClass.HTTP_410
    elif status == 429:
        error_class = ErrorClass.HTTP_429
    elif status >= 500:
        error_class = ErrorClass.HTTP_5XX
    else:  # other 4xx, and 1xx/3xx answers that are not usable redirects
        error_class = ErrorClass.HTTP_4XX
    return FetchError(error_class, f"HTTP {status}", http_status=status, retry_after=retry_after)


def classify_transport_error(exc: httpx.HTTPError) -> FetchError:
    """Map an httpx exception onto the taxonomy."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return FetchError(ErrorClass.CONNECT_TIMEOUT, text)
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
        return FetchError(ErrorClass.READ_TIMEOUT, text)
    if isinstance(exc, httpx.PoolTimeout):
        return FetchError(ErrorClass.DEADLINE, f"no free connection: {text}")
    if isinstance(exc, httpx.ConnectError):
        lowered = text.lower()
        if "ssl" in lowered or "certificate" in lowered or "tls" in lowered:
            return FetchError(ErrorClass.TLS_ERROR, text)
        if "name or service not known" in lowered or "nodename nor servname" in lowered:
            return FetchError(ErrorClass.DNS_FAILURE, text)
        return FetchError(ErrorClass.CONNECT_REFUSED, text)
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return FetchError(ErrorClass.RESET, text)
    if isinstance(exc, httpx.RemoteProtocolError):
        if any(marker in text.lower() for marker in _EARLY_CLOSE_MARKERS):
            return FetchError(ErrorClass.RESET, text)
        return FetchError(ErrorClass.PROTOCOL_ERROR, text)
    if isinstance(exc, httpx.ProtocolError):
        return FetchError(ErrorClass.PROTOCOL_ERROR, text)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return FetchError(ErrorClass.INVALID_URL, text)
    if isinstance(exc, httpx.TimeoutException):
        return FetchError(ErrorClass.READ_TIMEOUT, text)
    return FetchError(ErrorClass.RESET, f"{type(exc).__name__}: {text}")


class ImageFetcher:
    """Owns one pooled HTTP client, the DNS resolver and the decode thread pool. Use ``async with``."""

    def __init__(self, settings: FetchSettings | None = None, *, lookup: Lookup | None = None) -> None:
        self.settings = settings or FetchSettings()
        # ``lookup`` replaces the system resolver (tests map names to chosen addresses); the cache and
        # the address-safety check apply either way
        self.resolver = SafeResolver(
            allowed_networks=self.settings.allowed_networks,
            cache_ttl_s=self.settings.dns_cache_ttl_s,
            timeout_s=self.settings.dns_timeout_s,
            lookup=lookup,
        )
        self._client: httpx.AsyncClient | None = None
        self._transport: SafeTransport | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._host_slots = _HostSlots(self.settings.per_host_limit)

    async def __aenter__(self) -> ImageFetcher:
        s = self.settings
        limits = httpx.Limits(
            max_connections=s.connection_pool_size,
            max_keepalive_connections=s.connection_pool_size if s.enable_keepalive else 0,
            keepalive_expiry=30.0 if s.enable_keepalive else 0.0,
        )
        self._transport = SafeTransport(self.resolver, limits=limits)
        self._client = httpx.AsyncClient(
            transport=self._transport,
            # per-operation limits; the total deadline is enforced around the whole download
            timeout=httpx.Timeout(
                connect=min(s.connect_timeout_s, s.prefetch_download_timeout),
                read=min(s.read_timeout_s, s.prefetch_download_timeout),
                write=min(s.read_timeout_s, s.prefetch_download_timeout),
                pool=None,
            ),
            follow_redirects=False,  # followed by hand: counted, and each hop validated
            trust_env=False,  # no proxy or netrc from the environment
            headers={"User-Agent": s.user_agent, "Accept": _ACCEPT, "Accept-Encoding": ACCEPT_ENCODING},
        )
        self._executor = ThreadPoolExecutor(
            max_workers=s.image_resize_threads, thread_name_prefix="imgpipe-decode"
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()  # closes the transport and its pool too
            self._client = None
            self._transport = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # -- one URL ---------------------------------------------------------------------------------

    async def fetch(self, url: str, key: Any = None) -> FetchResult:
        """Download, check, decode and resize one URL. Never raises for a per-URL failure."""
        if self._client is None or self._executor is None:
            raise RuntimeError("ImageFetcher is not open: use 'async with ImageFetcher(settings) as fetcher'")
        result = FetchResult(key=key, url=url, ok=False)
        started = time.perf_counter()
        try:
            download = await self._download(url)
        except FetchError as exc:
            result.error = exc
            result.http_status = exc.http_status
            result.download_ms = (time.perf_counter() - started) * 1000.0
            return result
        except Exception as exc:  # a bug must cost one URL, not the run
            log.exception("unexpected error downloading %s", url)
            result.error = FetchError(ErrorClass.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            result.download_ms = (time.perf_counter() - started) * 1000.0
            return result
        result.download_ms = (time.perf_counter() - started) * 1000.0
        result.final_url = download.final_url
        result.redirects = download.redirects
        result.http_status = download.status
        result.content_type = download.content_type
        result.bytes = len(download.body)
        result.sha256 = hashlib.sha256(download.body).hexdigest()
        result.format = sniff_format(download.body[:SNIFF_BYTES])
        loop = asyncio.get_running_loop()
        decode_started = time.perf_counter()
        try:
            decoded = await loop.run_in_executor(self._executor, decode_image, download.body, self.settings)
        except FetchError as exc:
            exc.http_status = download.status
            result.error = exc
            result.decode_ms = (time.perf_counter() - decode_started) * 1000.0
            return result
        except Exception as exc:
            log.exception("unexpected error decoding %s", url)
            result.error = FetchError(ErrorClass.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            return result
        result.ok = True
        result.image_bytes = decoded.image_bytes
        result.format = decoded.format
        result.width, result.height = decoded.width, decoded.height
        result.resized_width, result.resized_height = decoded.resized_width, decoded.resized_height
        result.phash = decoded.phash
        result.decode_ms = decoded.decode_ms
        return result

    async def _download(self, url: str) -> _Download:
        assert self._client is not None and self._transport is not None
        current = prepare_url(url, self.resolver)
        loop = asyncio.get_running_loop()
        redirects = 0
        deadline_s = self.settings.prefetch_download_timeout
        try:
            # the clock starts once the first host slot is ours: queueing behind a busy host is not
            # the download's fault; everything after (redirects, other hosts, body) is inside it
            async with asyncio.timeout(None) as deadline:
                while True:
                    async with self._host_slots.hold(current.host):
                        if deadline.when() is None:
                            deadline.reschedule(loop.time() + deadline_s)
                        request = self._client.build_request("GET", current)
                        # straight to the transport: the client would parse a hostile Location header
                        # itself (and fail on spellings we must classify), redirects are ours to follow
                        response = await self._transport.handle_async_request(request)
                        response.request = request
                        try:
                            location = response.headers.get("location")
                            if response.status_code in _REDIRECT_STATUSES and location:
                                redirects += 1
                                if redirects > self.settings.max_redirects:
                                    raise FetchError(
                                        ErrorClass.TOO_MANY_REDIRECTS,
                                        f"more than {self.settings.max_redirects} redirects",
                                        http_status=response.status_code,
                                    )
                                current = prepare_url(
                                    urllib.parse.urljoin(str(current), location), self.resolver
                                )
                                continue
                            return await self._read_image_response(response, redirects)
                        finally:
                            await response.aclose()
        except TimeoutError as exc:
            raise FetchError(ErrorClass.DEADLINE, f"download exceeded its {deadline_s}s deadline") from exc
        except httpx.HTTPError as exc:
            raise classify_transport_error(exc) from exc

    async def _read_image_response(self, response: httpx.Response, redirects: int) -> _Download:
        settings = self.settings
        error = _status_error(response)
        if error is not None:
            raise error
        if settings.honour_noai_opt_out:
            directive = robots_opt_out(response.headers.get_list("x-robots-tag"))
            if directive:
                raise FetchError(
                    ErrorClass.OPTED_OUT, f"X-Robots-Tag: {directive}", http_status=response.status_code
                )
        declared = response.headers.get("content-length")
        if declared and declared.strip().isdigit() and int(declared) > settings.max_bytes:
            raise FetchError(
                ErrorClass.TOO_LARGE,
                f"Content-Length {int(declared)} exceeds {settings.max_bytes} bytes",
                http_status=response.status_code,
            )
        decoder = BoundedBodyDecoder(response.headers.get("content-encoding"), settings.max_bytes)
        body = bytearray()
        sniffed = False
        try:
            async for chunk in response.aiter_raw():
                if decoder.raw_bytes + len(chunk) > settings.max_bytes:
                    raise FetchError(ErrorClass.TOO_LARGE, f"body exceeds {settings.max_bytes} bytes")
                body += decoder.feed(chunk)
                if not sniffed and len(body) >= SNIFF_BYTES:
                    sniffed = True
                    self._check_signature(body)
            body += decoder.flush()
        except FetchError as exc:
            exc.http_status = response.status_code
            raise
        self._check_signature(body)
        return _Download(
            final_url=str(response.request.url),
            status=response.status_code,
            content_type=response.headers.get("content-type"),
            body=bytes(body),
            redirects=redirects,
        )

    @staticmethod
    def _check_signature(body: bytearray) -> None:
        # stop downloading an HTML page (or anything else) served under an image URL as early as possible
        if sniff_format(bytes(body[:SNIFF_BYTES])) is None:
            head = bytes(body[:16])
            raise FetchError(ErrorClass.NOT_AN_IMAGE, f"body starts with {head!r}, not an image signature")

    # -- many URLs -------------------------------------------------------------------------------

    async def stream(
        self, items: Iterable[tuple[Any, str]] | AsyncIterable[tuple[Any, str]]
    ) -> AsyncIterator[FetchResult]:
        """Fetch every (key, url) with bounded concurrency; one result per item, in completion order."""
        settings = self.settings
        workers = settings.prefetch_concurrent_downloads if settings.enable_prefetch else 1
        queue_size = settings.prefetch_queue_size if settings.enable_prefetch else 1
        results: asyncio.Queue[FetchResult | _Done] = asyncio.Queue(maxsize=queue_size)
        source = _SharedSource(items)

        async def worker() -> None:
            while True:
                item = await source.next()
                if item is None:
                    return
                key, url = item
                await results.put(await self.fetch(url, key=key))

        async def run_workers() -> None:
            failure: BaseException | None = None
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(workers):
                        group.create_task(worker())
            except asyncio.CancelledError:
                raise
            except BaseExceptionGroup as group_error:  # the input iterator failed
                failure = group_error.exceptions[0] if len(group_error.exceptions) == 1 else group_error
            await results.put(_Done(failure))

        runner = asyncio.create_task(run_workers())
        try:
            while True:
                item = await results.get()
                if isinstance(item, _Done):
                    if item.failure is not None:
                        raise item.failure
                    return
                yield item
        finally:
            if not runner.done():
                runner.cancel()
                try:
                    await runner
                except asyncio.CancelledError:
                    pass


@dataclass
class _Done:
    failure: BaseException | None


class _SharedSource:
    """One input iterator shared by many workers (an async generator cannot be advanced concurrently)."""

    def __init__(self, items: Iterable[tuple[Any, str]] | AsyncIterable[tuple[Any, str]]) -> None:
        self._async = aiter(items) if isinstance(items, AsyncIterable) else None
        self._sync = iter(items) if self._async is None else None  # type: ignore[arg-type]
        self._lock = asyncio.Lock()
        self._exhausted = False

    async def next(self) -> tuple[Any, str] | None:
        if self._exhausted:
            return None
        if self._sync is not None:
            item = next(self._sync, None)
        else:
            async with self._lock:
                if self._exhausted:
                    return None
                try:
                    item = await anext(self._async)  # type: ignore[arg-type]
                except StopAsyncIteration:
                    item = None
        if item is None:
            self._exhausted = True
            return None
        key, url = item
        return key, url
