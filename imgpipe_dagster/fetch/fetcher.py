"""The image fetcher: bounded, safe, polite downloads on one pooled httpx client, decoded in threads.

``fetch`` turns one URL into one :class:`FetchResult` and never raises for a per-URL failure;
``stream`` fetches an input of (key, url) pairs with up to ``max_in_flight`` downloads in flight and
yields the results in completion order through a queue of ``prefetch_queue_size``.

The life of one URL: its host's gate (``hosts.py``: slow start, breaker, pauses, rate, queue
length; waiting there holds no global slot) → one of ``max_in_flight`` global slots (the total
deadline starts here) → robots.txt of the host, fetched once → the request, with a time-to-first-byte
limit → the body, with a minimum transfer rate after a grace period and a byte reservation from
``body_bytes_in_flight`` → the slot is released → decode and resize in the thread pool → the byte
reservation is released.

``max_in_flight`` may be changed at any time from the fetcher's event loop; ``in_flight`` counts the
downloads holding a slot now and ``slot_seconds`` the seconds slots were held, by outcome ("ok" or
the error class value). Memory is bounded whatever the input and whatever ``max_in_flight``: bodies
reserve their bytes from ``body_bytes_in_flight`` (each at most ``max_bytes``, checked on
Content-Length, while streaming and after Content-Encoding), each decode thread holds at most
``max_image_pixels`` pixels, and queued results hold only the small resized image.

Connections are pooled per origin (transport.py): a pool may open max(``connection_pool_size``,
``max_in_flight_ceiling``) connections, so it never caps the downloads in flight below
``max_in_flight`` (a request never waits for a pooled connection while it holds a slot); each keeps up
to ``per_host_limit`` idle keep-alive connections, and idle pools beyond ``connection_pool_size``
origins are closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from imgpipe_dagster.fetch.address import connectable, host_name_problem, parse_ip_literal
from imgpipe_dagster.fetch.decode import SNIFF_BYTES, decode_image, sniff_format
from imgpipe_dagster.fetch.encoding import ACCEPT_ENCODING, BoundedBodyDecoder
from imgpipe_dagster.fetch.errors import ErrorClass, FetchError
from imgpipe_dagster.fetch.headers import parse_retry_after, robots_opt_out
from imgpipe_dagster.fetch.hosts import HOST_FAILURES, STALLED_ANSWERS, Admission, HostBook, HostState
from imgpipe_dagster.fetch.resolver import Lookup, SafeResolver
from imgpipe_dagster.fetch.robots import RobotsRules
from imgpipe_dagster.fetch.settings import FetchSettings
from imgpipe_dagster.fetch.transport import SafeTransport

log = logging.getLogger(__name__)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_ACCEPT = "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5"
# h11's messages for a connection that ended early: the peer went away, which a retry may survive
_EARLY_CLOSE_MARKERS = ("peer closed connection", "server disconnected")
# how often a full look-ahead looks again at whether the URL in hand could be deferred at once
_ROOM_RECHECK_S = 0.5
# the httpcore trace event at which the request is on its way: the time-to-first-byte clock starts
_REQUEST_SENT_EVENT = "http11.send_request_headers.started"


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


@dataclass
class _Progress:
    """What one download got to, for the host's health and the byte budget."""

    admission: Admission  # the URL's host slot, told as soon as the host answers
    answered: bool = False  # the URL's own host answered its request (any status; robots.txt aside)
    robots_unavailable: bool = False  # robots.txt answered 429/5xx: the host counts as failing
    reserved: int = 0  # body bytes reserved from body_bytes_in_flight


def origin_key(url: httpx.URL) -> str:
    """The host a URL belongs to for health and politeness: scheme, name and port."""
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{url.scheme}://{url.host}:{port}"


def origin_of(url: object) -> str | None:
    """origin_key of an unchecked URL string, or None (it will fail as INVALID_URL anyway)."""
    try:
        return origin_key(httpx.URL(str(url).strip()))
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError):
        return None


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
    elif (problem := host_name_problem(host)) is not None:
        raise FetchError(ErrorClass.INVALID_URL, problem)
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
    """Owns one pooled HTTP client, the DNS resolver, the host book and the decode thread pool.

    Use ``async with``. ``max_in_flight``, ``in_flight`` and ``slot_seconds`` are described in the
    module docstring; everything runs on the event loop that opened the fetcher.
    """

    def __init__(self, settings: FetchSettings, *, lookup: Lookup | None = None) -> None:
        self.settings = settings
        s = self.settings
        # ``lookup`` replaces the system resolver (tests map names to chosen addresses); the cache and
        # the address-safety check apply either way
        self.resolver = SafeResolver(
            allowed_networks=s.allowed_networks,
            cache_ttl_s=s.dns_cache_ttl_s,
            timeout_s=s.dns_timeout_s,
            lookup=lookup,
        )
        self.hosts = HostBook(s)
        self._client: httpx.AsyncClient | None = None
        self._transport: SafeTransport | None = None
        self._executor: ThreadPoolExecutor | None = None
        # the legacy prefetch_concurrent_downloads is where downloads in flight start
        self._max_in_flight = min(s.prefetch_concurrent_downloads if s.enable_prefetch else 1,
                                  s.max_in_flight_ceiling)  # fmt: skip
        self.in_flight = 0  # downloads holding a global slot now
        self.slot_seconds: Counter[str] = Counter()  # seconds slots were held, by outcome kind
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._bytes_reserved = 0
        self._byte_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def max_in_flight(self) -> int:
        """Downloads allowed to hold a global slot at once (1..max_in_flight_ceiling)."""
        return self._max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self._max_in_flight = max(1, min(int(value), self.settings.max_in_flight_ceiling))
        self._grant_slots()  # growing admits waiters now; shrinking lets downloads in flight finish

    @property
    def bytes_reserved(self) -> int:
        """Body bytes reserved now by downloads in flight and bodies waiting to decode."""
        return self._bytes_reserved

    async def __aenter__(self) -> ImageFetcher:
        s = self.settings
        limits = httpx.Limits(  # per origin (transport.py pools connections per origin)
            # never below the slots: a download must not wait for a connection while it holds one
            max_connections=max(s.connection_pool_size, s.max_in_flight_ceiling),
            # the host gate lets at most per_host_limit requests in at once: that many stay warm
            max_keepalive_connections=s.per_host_limit if s.enable_keepalive else 0,
            keepalive_expiry=30.0 if s.enable_keepalive else 0.0,
        )
        self._transport = SafeTransport(self.resolver, limits=limits, origins_kept=s.connection_pool_size)
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
            headers={
                "User-Agent": s.user_agent_header,
                "Accept": _ACCEPT,
                "Accept-Encoding": ACCEPT_ENCODING,
            },
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

    # -- global slots and the byte budget ----------------------------------------------------------

    async def _take_slot(self) -> None:
        if self.in_flight < self._max_in_flight and not self._slot_waiters:
            self.in_flight += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as we were cancelled
                self._give_slot()
            raise

    def _give_slot(self) -> None:
        self.in_flight -= 1
        self._grant_slots()

    def _grant_slots(self) -> None:
        while self._slot_waiters and self.in_flight < self._max_in_flight:
            future = self._slot_waiters.popleft()
            if not future.done():
                self.in_flight += 1
                future.set_result(None)

    async def _reserve_bytes(self, nbytes: int, progress: _Progress) -> None:
        cap = self.settings.body_bytes_in_flight
        if not self._byte_waiters and self._bytes_reserved + nbytes <= cap:
            self._bytes_reserved += nbytes
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._byte_waiters.append((nbytes, future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._bytes_reserved -= nbytes
                    self._grant_bytes()
                raise
        progress.reserved += nbytes

    def _release_bytes(self, progress: _Progress) -> None:
        if progress.reserved:
            self._bytes_reserved -= progress.reserved
            progress.reserved = 0
            self._grant_bytes()

    def _grant_bytes(self) -> None:
        cap = self.settings.body_bytes_in_flight
        while self._byte_waiters:
            nbytes, future = self._byte_waiters[0]
            if future.done():
                self._byte_waiters.popleft()
                continue
            if self._bytes_reserved + nbytes > cap:
                return  # in order: a large body is not starved by small ones
            self._byte_waiters.popleft()
            self._bytes_reserved += nbytes
            future.set_result(None)

    # -- one URL ---------------------------------------------------------------------------------

    async def fetch(self, url: str, key: Any = None) -> FetchResult:
        """Download, check, decode and resize one URL. Never raises for a per-URL failure."""
        if self._client is None or self._executor is None:
            raise RuntimeError("ImageFetcher is not open: use 'async with ImageFetcher(settings) as fetcher'")
        result = FetchResult(key=key, url=url, ok=False)
        try:
            first = prepare_url(url, self.resolver)
            # waiting at the host's gate holds no global slot; deferral and unreachability cost nothing
            admission = await self.hosts.admit(origin_key(first))
        except FetchError as exc:
            return self._failed(result, exc, 0.0)
        progress = _Progress(admission)
        try:
            try:
                download, slot_s = await self._download_in_slot(first, progress)
            except _SlotFailure as failure:
                return self._failed(result, failure.error, failure.slot_s)
            return await self._decode(result, download, slot_s)
        finally:
            self._release_bytes(progress)

    def _failed(self, result: FetchResult, error: FetchError, slot_s: float) -> FetchResult:
        result.error = error
        result.http_status = error.http_status
        result.download_ms = slot_s * 1000.0
        if slot_s:  # deferred, unreachable and invalid URLs never held a slot
            self.slot_seconds[error.error_class.value] += slot_s
        return result

    async def _download_in_slot(self, first: httpx.URL, progress: _Progress) -> tuple[_Download, float]:
        """Robots check and download while holding a global slot; the host learns how it went."""
        await self._take_slot()
        slot_started = time.perf_counter()
        error: FetchError | None = None
        try:
            if self.settings.obey_robots_txt:
                await self._check_robots(progress.admission.host, first, progress)
            return await self._download(first, progress), time.perf_counter() - slot_started
        except FetchError as exc:
            error = exc
        except Exception as exc:  # a bug must cost one URL, not the run
            log.exception("unexpected error downloading %s", first)
            error = FetchError(ErrorClass.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            slot_s = time.perf_counter() - slot_started
            self._give_slot()
            if progress.robots_unavailable or (error is not None and error.error_class in STALLED_ANSWERS):
                health = "failed"
            elif progress.answered:
                health = "answered"
            elif error is not None and error.error_class in HOST_FAILURES:
                health = "failed"
            else:
                health = "other"
            self.hosts.release(progress.admission, health=health, failure=error, elapsed_s=slot_s)
        raise _SlotFailure(error, slot_s)

    async def _decode(self, result: FetchResult, download: _Download, slot_s: float) -> FetchResult:
        result.download_ms = slot_s * 1000.0
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
            self.slot_seconds[exc.error_class.value] += slot_s
            return result
        except Exception as exc:
            log.exception("unexpected error decoding %s", result.url)
            result.error = FetchError(ErrorClass.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            self.slot_seconds[ErrorClass.INTERNAL_ERROR.value] += slot_s
            return result
        self.slot_seconds["ok"] += slot_s
        result.ok = True
        result.image_bytes = decoded.image_bytes
        result.format = decoded.format
        result.width, result.height = decoded.width, decoded.height
        result.resized_width, result.resized_height = decoded.resized_width, decoded.resized_height
        result.phash = decoded.phash
        result.decode_ms = decoded.decode_ms
        return result

    async def _send(self, url: httpx.URL, headers: dict[str, str] | None = None) -> httpx.Response:
        """One request, cut with TTFB_TIMEOUT when no answer comes within ttfb_timeout_s of sending it."""
        assert self._client is not None and self._transport is not None
        loop = asyncio.get_running_loop()
        limit_s = self.settings.ttfb_timeout_s
        first_byte = asyncio.timeout(None)

        async def trace(event: str, info: dict) -> None:
            if event == _REQUEST_SENT_EVENT:  # connected: from here on the server is thinking
                first_byte.reschedule(loop.time() + limit_s)

        request = self._client.build_request("GET", url, headers=headers, extensions={"trace": trace})
        try:
            async with first_byte:
                # straight to the transport: the client would parse a hostile Location header itself
                # (and fail on spellings we must classify); redirects are ours to follow
                response = await self._transport.handle_async_request(request)
        except TimeoutError as exc:
            if first_byte.expired():
                raise FetchError(ErrorClass.TTFB_TIMEOUT, f"no answer within {limit_s}s of the request") from exc
            raise
        response.request = request
        return response

    async def _download(self, first: httpx.URL, progress: _Progress) -> _Download:
        current = first
        redirects = 0
        deadline_s = self.settings.prefetch_download_timeout
        try:
            # the clock starts once a global slot is ours: waiting for a busy host is not the
            # download's fault; everything after (redirects, other hosts, body) is inside it
            async with asyncio.timeout(deadline_s):
                while True:
                    response = await self._send(current)
                    if redirects == 0:
                        self._answered(progress, response.status_code)
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
                            current = prepare_url(urllib.parse.urljoin(str(current), location), self.resolver)
                            continue
                        return await self._read_image_response(response, redirects, progress)
                    finally:
                        await response.aclose()
        except TimeoutError as exc:
            raise FetchError(ErrorClass.DEADLINE, f"download exceeded its {deadline_s}s deadline") from exc
        except httpx.HTTPError as exc:
            raise classify_transport_error(exc) from exc

    def _answered(self, progress: _Progress, status: int, *, robots: bool = False) -> None:
        # a robots.txt answer shows the host alive, but the URL's own request may still get none
        progress.answered = progress.answered or not robots
        self.hosts.answered(progress.admission, status=status, robots=robots)

    async def _check_robots(self, host: HostState, first: httpx.URL, progress: _Progress) -> None:
        if host.robots is None:
            host.robots = await self._fetch_robots(first, progress)
            self.hosts.keep(host)
        if not host.robots.allows(str(first)):
            raise FetchError(ErrorClass.ROBOTS_DISALLOWED, f"robots.txt of {first.host} disallows this URL")

    async def _fetch_robots(self, first: httpx.URL, progress: _Progress) -> RobotsRules:
        """The host's robots.txt rules (see robots.py for what each answer means)."""
        settings = self.settings
        url = httpx.URL(f"{first.scheme}://{first.netloc.decode('ascii')}/robots.txt")
        try:
            async with asyncio.timeout(settings.prefetch_download_timeout):
                for hop in range(settings.max_redirects + 1):
                    response = await self._send(url, headers={"Accept": "text/plain", "Accept-Encoding": "identity"})
                    unavailable = response.status_code == 429 or response.status_code >= 500
                    if hop == 0 and not unavailable:  # an unavailable robots.txt is no sign of health
                        self._answered(progress, response.status_code, robots=True)
                    try:
                        status = response.status_code
                        location = response.headers.get("location")
                        if status in _REDIRECT_STATUSES and location:
                            url = prepare_url(urllib.parse.urljoin(str(url), location), self.resolver)
                            continue
                        if 200 <= status < 300:
                            body = bytearray()
                            async for chunk in response.aiter_raw():
                                body += chunk
                                if len(body) >= settings.robots_max_bytes:
                                    break
                            truncated = len(body) >= settings.robots_max_bytes
                            return RobotsRules.from_body(bytes(body[: settings.robots_max_bytes]), truncated=truncated)
                        if unavailable:
                            progress.robots_unavailable = True
                            error = _status_error(response)
                            assert error is not None
                            error.message = f"robots.txt answered HTTP {status}"
                            raise error
                        return RobotsRules(None)  # 4xx: no rules
                    finally:
                        await response.aclose()
                return RobotsRules(None)  # a redirect loop: treated as no robots.txt (RFC 9309 §2.3.1.2)
        except TimeoutError as exc:
            raise FetchError(ErrorClass.DEADLINE, "robots.txt took longer than the download deadline") from exc
        except httpx.HTTPError as exc:
            raise classify_transport_error(exc) from exc

    async def _read_image_response(self, response: httpx.Response, redirects: int, progress: _Progress) -> _Download:
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
        declared_bytes = int(declared) if declared and declared.strip().isdigit() else None
        if declared_bytes is not None and declared_bytes > settings.max_bytes:
            raise FetchError(
                ErrorClass.TOO_LARGE,
                f"Content-Length {declared_bytes} exceeds {settings.max_bytes} bytes",
                http_status=response.status_code,
            )
        encoding = response.headers.get("content-encoding")
        # a body we know the size of reserves that; an unknown or encoded one the most it may become
        known = declared_bytes is not None and (not encoding or encoding.strip().lower() == "identity")
        await self._reserve_bytes(declared_bytes if known else settings.max_bytes, progress)
        decoder = BoundedBodyDecoder(encoding, settings.max_bytes)
        body = bytearray()
        sniffed = False
        loop = asyncio.get_running_loop()
        min_rate = settings.min_transfer_rate_bps
        body_started = loop.time()
        too_slow = asyncio.timeout(None)

        def allow_until(received: int) -> None:
            # the body must have averaged min_rate since its headers once the grace period is over
            if min_rate > 0:
                too_slow.reschedule(body_started + max(settings.min_rate_grace_s, received / min_rate))

        try:
            async with too_slow:
                allow_until(0)
                async for chunk in response.aiter_raw():
                    if decoder.raw_bytes + len(chunk) > settings.max_bytes:
                        raise FetchError(ErrorClass.TOO_LARGE, f"body exceeds {settings.max_bytes} bytes")
                    body += decoder.feed(chunk)
                    allow_until(decoder.raw_bytes)
                    if not sniffed and len(body) >= SNIFF_BYTES:
                        sniffed = True
                        self._check_signature(body)
            body += decoder.flush()
        except TimeoutError as exc:
            if too_slow.expired():
                raise FetchError(
                    ErrorClass.TOO_SLOW,
                    f"{decoder.raw_bytes} bytes in {loop.time() - body_started:.1f}s, under {min_rate:.0f} B/s",
                    http_status=response.status_code,
                ) from exc
            raise
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

    def _lookahead(self) -> int:
        # URLs taken from the input and not yet handed out: twice the slots, so URLs waiting at a busy
        # host's gate do not leave slots idle while other hosts' URLs could run
        return 2 * self._max_in_flight

    async def stream(
        self, items: Iterable[tuple[Any, str]] | AsyncIterable[tuple[Any, str]]
    ) -> AsyncIterator[FetchResult]:
        """Fetch every (key, url) with up to ``max_in_flight`` in flight; one result per item, in
        completion order. At most twice ``max_in_flight`` items (and the one in hand) are taken from
        the input ahead of the results handed out (plus the results queue)."""
        settings = self.settings
        queue_size = settings.prefetch_queue_size if settings.enable_prefetch else 1
        results: asyncio.Queue[FetchResult | _Done] = asyncio.Queue(maxsize=queue_size)
        source = _SharedSource(items)
        room = asyncio.Event()
        pending = 0

        async def one(key: Any, url: str, deferral: FetchError | None) -> None:
            nonlocal pending
            try:
                if deferral is not None:  # its stalled host cannot take it: no request, no slot
                    result = self._failed(FetchResult(key=key, url=url, ok=False), deferral, 0.0)
                else:
                    result = await self.fetch(url, key=key)
                await results.put(result)
            finally:
                pending -= 1
                room.set()

        async def intake() -> None:
            nonlocal pending
            failure: BaseException | None = None
            try:
                async with asyncio.TaskGroup() as group:
                    while True:
                        item = await source.next()
                        if item is None:
                            break
                        origin = origin_of(item[1])
                        deferral = None
                        while pending >= self._lookahead() and not self.hosts.would_defer(origin):
                            deferral = self.hosts.stalled(origin)
                            if deferral is not None:
                                break
                            # a host hoarding the look-ahead gives up its newest URL (deferred) to
                            # another host's URL; then wait for a URL to finish, looking again now
                            # and then (a hanging host shows itself only as its requests age)
                            self.hosts.make_room(origin)
                            room.clear()
                            try:  # asyncio.timeout, not wait_for: wait_for can swallow a cancel
                                async with asyncio.timeout(_ROOM_RECHECK_S):
                                    await room.wait()
                            except TimeoutError:
                                pass
                        pending += 1  # a URL its host defers at once passes even a full look-ahead
                        group.create_task(one(*item, deferral))
            except asyncio.CancelledError:
                raise
            except BaseExceptionGroup as group_error:  # the input iterator failed
                failure = group_error.exceptions[0] if len(group_error.exceptions) == 1 else group_error
            await results.put(_Done(failure))

        runner = asyncio.create_task(intake())
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


class _SlotFailure(Exception):
    """A download that failed while holding a slot, with how long it held it."""

    def __init__(self, error: FetchError | None, slot_s: float) -> None:
        super().__init__(str(error))
        self.error = error or FetchError(ErrorClass.INTERNAL_ERROR, "download ended without a result")
        self.slot_s = slot_s


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
