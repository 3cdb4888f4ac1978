"""Settings of the fetch stage (download, address safety, decode and resize).

Field names of legacy settings are the legacy ``.env`` names in snake_case. They have no default here:
profile values come only from ``profiles/<name>.yaml`` through ``imgpipe_dagster.settings_map``
(``fetch_settings``, or ``medium_fetch_settings`` for tests and benchmarks). The other fields are new
policy, with defaults documented where they are declared.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

# the product token robots.txt groups are matched against ("User-agent: imgpipe")
ROBOTS_TOKEN = "imgpipe"
DEFAULT_USER_AGENT = "imgpipe-dagster/0.1 (image analysis; honours robots.txt and X-Robots-Tag noai)"


@dataclass
class FetchSettings:
    # legacy CONNECTION_POOL_SIZE: hosts whose idle keep-alive connections are kept for reuse (up to
    # per_host_limit each; connections are pooled per host). A host's pool may open max(this,
    # max_in_flight_ceiling) connections, so it never caps downloads in flight below max_in_flight
    # (a download waiting for a pooled connection would hold a slot doing nothing)
    connection_pool_size: int
    # legacy ENABLE_KEEPALIVE: reuse connections between downloads from the same host
    enable_keepalive: bool
    # legacy ENABLE_PREFETCH: download ahead of the consumer; off means one download at a time
    enable_prefetch: bool
    # legacy PREFETCH_QUEUE_SIZE: finished results waiting for the consumer (bounds memory)
    prefetch_queue_size: int
    # legacy PREFETCH_CONCURRENT_DOWNLOADS: downloads in flight when a fetcher starts
    # (ImageFetcher.max_in_flight starts here; the engine raises it at run time, up to the ceiling)
    prefetch_concurrent_downloads: int
    # legacy PREFETCH_DOWNLOAD_TIMEOUT: total seconds for one download, redirects and body included
    prefetch_download_timeout: float
    # legacy IMAGE_RESIZE_THREADS: threads that decode and resize (Pillow releases the GIL)
    image_resize_threads: int

    # most bytes of one image, checked on Content-Length, while streaming and after Content-Encoding
    max_bytes: int = 20 * 1024 * 1024
    # most redirects followed for one URL; one more is TOO_MANY_REDIRECTS
    max_redirects: int = 5
    # most downloads in flight to one host, so a corpus dominated by one site does not flood it (8 is
    # Scrapy's CONCURRENT_REQUESTS_PER_DOMAIN). A host starts at one and doubles per answer (slow
    # start), so a dead or hostile host sees one request at a time
    per_host_limit: int = 8
    # User-Agent header sent with every request; contact_url is appended as "(+<url>)"
    user_agent: str = DEFAULT_USER_AGENT
    # where a site owner reaches the operator (a page or mailto:); set it for any real crawl
    contact_url: str = ""

    # -- letting bad URLs go early ---------------------------------------------------------------
    # seconds from sending a request to its response headers. Healthy image hosts answer in well under
    # a second (the realistic web's median is 0.25 s); a hanging host otherwise holds a slot to the
    # total deadline, three times. 3 s is 12x that median and a third of the 10 s deadline
    ttfb_timeout_s: float = 3.0
    # bytes/s the body must average once min_rate_grace_s has passed since its headers. 2 KiB/s is
    # a poor mobile link's floor; a 160 B/s trickle is cut when the grace period ends
    min_transfer_rate_bps: float = 2048.0
    # seconds a body may take before the rate applies (covers TCP slow start and a cold CDN cache)
    min_rate_grace_s: float = 2.0

    # -- hosts have health (a host = scheme, name and port of the URL) ---------------------------
    # consecutive connect failures, DNS failures or timeouts (no answer at all) that open a host's
    # breaker; any answer, even a 404, resets the count
    host_failures_to_open: int = 3
    # seconds before the first probe of an open breaker; doubles after each failed probe
    host_probe_interval_s: float = 30.0
    # failed probes after which the host is unreachable for this fetcher: its URLs fail as
    # HOST_UNREACHABLE without a request (30+60+120+240+480 s ≈ 15 min of probing with the defaults)
    host_probes_before_unreachable: int = 5
    # seconds a host is paused after a 429/503 without a (valid) Retry-After
    host_pause_default_s: float = 5.0
    # a URL whose host queue would keep it waiting longer than this is deferred (HOST_DEFERRED)
    # instead of occupying the fetcher's look-ahead while other hosts' URLs could run
    host_queue_wait_s: float = 30.0

    # -- polite by default ------------------------------------------------------------------------
    # requests per second to one host (token bucket, burst of per_host_limit). 20/s keeps the top
    # domain of a web-scale corpus (a few % of 20M URLs a day ≈ 12/s) unthrottled while no small site
    # sees more than a busy browser session; set it higher only for hosts you have permission for
    per_host_requests_per_s: float = 20.0
    # fetch robots.txt once per host and never request what it disallows for ROBOTS_TOKEN; switch off
    # only for corpora you have the owner's permission to fetch
    obey_robots_txt: bool = True
    # most bytes of a robots.txt read (Google reads 500 KiB); the rules in the first part still apply
    robots_max_bytes: int = 512 * 1024

    # -- how much runs at once ------------------------------------------------------------------
    # highest ImageFetcher.max_in_flight may go (one asyncio loop holds ~1000 sockets comfortably)
    max_in_flight_ceiling: int = 1000
    # most body bytes held by downloads in flight and bodies waiting to decode; memory stays bounded
    # whatever max_in_flight is (a body reserves its Content-Length, or max_bytes when unknown)
    body_bytes_in_flight: int = 256 * 1024 * 1024
    # refuse images whose response carries X-Robots-Tag noai / noimageai (OPTED_OUT)
    honour_noai_opt_out: bool = True
    # CIDR networks exempt from the address-safety block list (tests: ["127.0.0.0/8"]); empty in production
    allowed_networks: list[str] = field(default_factory=list)
    # most pixels of an image we decode (checked from the header, before decoding); 40 MP ≈ 120 MB as RGB
    max_image_pixels: int = 40_000_000
    # pixel budget of the resized image sent to the model (448×448 → 256 Qwen-VL image tokens)
    target_pixels: int = 448 * 448
    # both sides of the resized image are multiples of this (Qwen-VL patch 14 × merge 2)
    patch_multiple: int = 28
    # seconds a DNS answer is reused (a failed lookup is reused for a tenth of it)
    dns_cache_ttl_s: float = 300.0
    # seconds one DNS lookup may take
    dns_timeout_s: float = 5.0
    # seconds for the TCP/TLS handshake (inside the total deadline)
    connect_timeout_s: float = 5.0
    # seconds without a byte from the server before READ_TIMEOUT (inside the total deadline)
    read_timeout_s: float = 5.0
    # encoding of the resized image handed to the GPU server: "JPEG" (default) or "PNG".
    # JPEG q90 is visually lossless at 448 px, ~5x smaller than PNG and ~5x faster to encode and decode,
    # and almost every source is JPEG already; PNG is there for exact-pixel tests.
    output_format: str = "JPEG"
    # JPEG quality of the resized image (ignored for PNG)
    output_quality: int = 90

    def __post_init__(self) -> None:
        positive = {
            "connection_pool_size": self.connection_pool_size,
            "prefetch_queue_size": self.prefetch_queue_size,
            "prefetch_concurrent_downloads": self.prefetch_concurrent_downloads,
            "prefetch_download_timeout": self.prefetch_download_timeout,
            "image_resize_threads": self.image_resize_threads,
            "max_bytes": self.max_bytes,
            "per_host_limit": self.per_host_limit,
            "max_image_pixels": self.max_image_pixels,
            "target_pixels": self.target_pixels,
            "patch_multiple": self.patch_multiple,
            "dns_timeout_s": self.dns_timeout_s,
            "connect_timeout_s": self.connect_timeout_s,
            "read_timeout_s": self.read_timeout_s,
            "ttfb_timeout_s": self.ttfb_timeout_s,
            "host_failures_to_open": self.host_failures_to_open,
            "host_probe_interval_s": self.host_probe_interval_s,
            "host_probes_before_unreachable": self.host_probes_before_unreachable,
            "host_pause_default_s": self.host_pause_default_s,
            "host_queue_wait_s": self.host_queue_wait_s,
            "per_host_requests_per_s": self.per_host_requests_per_s,
            "robots_max_bytes": self.robots_max_bytes,
            "max_in_flight_ceiling": self.max_in_flight_ceiling,
            "body_bytes_in_flight": self.body_bytes_in_flight,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"FetchSettings.{name} must be > 0, got {value!r}")
        if self.max_redirects < 0:
            raise ValueError(f"FetchSettings.max_redirects must be >= 0, got {self.max_redirects!r}")
        if self.min_transfer_rate_bps < 0 or self.min_rate_grace_s < 0:
            raise ValueError("FetchSettings.min_transfer_rate_bps and min_rate_grace_s must be >= 0")
        if self.body_bytes_in_flight < self.max_bytes:
            raise ValueError("FetchSettings.body_bytes_in_flight must hold at least one max_bytes body")
        if self.dns_cache_ttl_s < 0:
            raise ValueError(f"FetchSettings.dns_cache_ttl_s must be >= 0, got {self.dns_cache_ttl_s!r}")
        if self.target_pixels < self.patch_multiple**2:
            raise ValueError("FetchSettings.target_pixels must hold at least one patch_multiple² tile")
        self.output_format = self.output_format.upper()
        if self.output_format not in ("JPEG", "PNG"):
            raise ValueError(f"FetchSettings.output_format must be JPEG or PNG, got {self.output_format!r}")
        if not 1 <= self.output_quality <= 100:
            raise ValueError(f"FetchSettings.output_quality must be 1..100, got {self.output_quality!r}")
        for cidr in self.allowed_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"FetchSettings.allowed_networks: {cidr!r} is not a CIDR network") from exc

    @property
    def user_agent_header(self) -> str:
        """The User-Agent sent: ``user_agent`` with the operator's contact URL, when set."""
        return f"{self.user_agent} (+{self.contact_url})" if self.contact_url else self.user_agent
