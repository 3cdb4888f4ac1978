"""Prometheus metrics of one GPU server (its own registry, so tests can build many apps)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "imgpipe_gpu_server"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.images_processed = Counter(
            f"{PREFIX}_images_processed", "Images analysed without error", registry=registry
        )
        self.images_failed = Counter(
            f"{PREFIX}_images_failed", "Images that ended with an error", registry=registry
        )
        self.requests = Counter(
            f"{PREFIX}_requests", "Analyze requests by HTTP status", ["status"], registry=registry
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per generate() call",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.generation_seconds = Histogram(
            f"{PREFIX}_generation_seconds",
            "Seconds per generate() call",
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.prepare_seconds = Histogram(
            f"{PREFIX}_prepare_seconds",
            "Seconds of CPU preparation per batch",
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_seconds",
            "Seconds per analyze request, admission to response",
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Images waiting for a batch", registry=registry)
        self.queue_capacity = Gauge(f"{PREFIX}_queue_capacity", "Images the queue admits", registry=registry)
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight_images", "Images in batches being prepared or generated", registry=registry
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when the model is loaded and serving", registry=registry)
        self.gpu_memory_used = Gauge(
            f"{PREFIX}_gpu_memory_used_bytes",
            "GPU memory in use (NVML, else torch allocator)",
            registry=registry,
        )

    def bind_gauges(
        self,
        *,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        ready: Callable[[], float],
        gpu_memory_used: Callable[[], float],
    ) -> None:
        """Gauges read live values at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        self.ready.set_function(ready)
        self.gpu_memory_used.set_function(gpu_memory_used)

    def observe_batch(self, size: int, generate_seconds: float, prepare_seconds: float) -> None:
        self.batch_size.observe(size)
        self.generation_seconds.observe(generate_seconds)
        self.prepare_seconds.observe(prepare_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
