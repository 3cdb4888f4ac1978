"""Settings of the fetch stage (download, address safety, decode and resize).

Field names of legacy settings are the legacy ``.env`` names in snake_case; defaults are the legacy
MEDIUM profile. The other fields are new and documented where they are declared.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

DEFAULT_USER_AGENT = "imgpipe-dagster/0.1 (image analysis; honours X-Robots-Tag noai)"


@dataclass
class FetchSettings:
    # legacy CONNECTION_POOL_SIZE: most open connections of the one shared HTTP client
    connection_pool_size: int = 150
    # legacy ENABLE_KEEPALIVE: reuse connections between downloads from the same host
    enable_keepalive: bool = True
    # legacy ENABLE_PREFETCH: download ahead of the consumer; off means one download at a time
    enable_prefetch: bool = True
    # legacy PREFETCH_QUEUE_SIZE: finished results waiting for the consumer (bounds memory)
    prefetch_queue_size: int = 30
    # legacy PREFETCH_CONCURRENT_DOWNLOADS: downloads in flight at once
    prefetch_concurrent_downloads: int = 15
    # legacy PREFETCH_DOWNLOAD_TIMEOUT: total seconds for one download, redirects and body included
    prefetch_download_timeout: float = 10.0
    # legacy IMAGE_RESIZE_THREADS: threads that decode and resize (Pillow releases the GIL)
    image_resize_threads: int = 4

    # most bytes of one image, checked on Content-Length, while streaming and after Content-Encoding
    max_bytes: int = 20 * 1024 * 1024
    # most redirects followed for one URL; one more is TOO_MANY_REDIRECTS
    max_redirects: int = 5
    # most downloads in flight to one host, so a corpus dominated by one site does not flood it
    per_host_limit: int = 8
    # User-Agent header sent with every request
    user_agent: str = DEFAULT_USER_AGENT
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
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"FetchSettings.{name} must be > 0, got {value!r}")
        if self.max_redirects < 0:
            raise ValueError(f"FetchSettings.max_redirects must be >= 0, got {self.max_redirects!r}")
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
