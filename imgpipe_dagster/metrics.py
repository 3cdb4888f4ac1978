"""The pipeline's rate, backlog and errors in Prometheus text format (`imgpipe metrics --port 9108`).

The GPU servers export their own /metrics (``imgpipe_gpu_server_*``); this exporter adds what only
the database knows. Each scrape runs the store.stats queries, at most once per ``min_interval_s``
(the failure count by class reads the failed results, so scrapes every few seconds reuse one answer).

Names (Prometheus conventions: base units, ``_total`` for counts):
  imgpipe_urls_total{state}                  URLs of the corpus in each state (pending, leased,
                                             failed_retryable, failed_permanent, done)
  imgpipe_urls_processed_total               URLs in a final state (done + failed_permanent)
  imgpipe_shards_total{state}                shards done / unfinished
  imgpipe_throughput_urls_per_second{window} URLs finished per second over 10m / 1h
  imgpipe_eta_seconds                        time to finish the backlog at the 10-minute rate (NaN: no rate)
  imgpipe_url_failures_total{error_class}    URLs that failed for good, by error class
  imgpipe_gpu_images_per_second{gpu}         images per second per GPU over the last 10 minutes
  imgpipe_up                                 1 when the last database read worked
"""

from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.stats import Progress, progress

log = logging.getLogger("imgpipe.metrics")

DEFAULT_PORT = 9108
URL_STATES = ("pending", "leased", "failed_retryable", "failed_permanent", "done")


def failures_by_class(conn: psycopg.Connection) -> dict[str, int]:
    return {
        str(error_class or "unknown"): int(n)
        for error_class, n in conn.execute(
            "SELECT error_class, count(*) FROM url_analysis_results WHERE status <> 'ok' GROUP BY 1"
        ).fetchall()
    }


def pipeline_metrics(p: Progress, failures: dict[str, int]) -> list[Metric]:
    """The metric families for one reading of the database."""
    urls = GaugeMetricFamily("imgpipe_urls_total", "URLs of the corpus by state", labels=["state"])
    for state in URL_STATES:
        urls.add_metric([state], p.urls_by_state.get(state, 0))
    processed = CounterMetricFamily("imgpipe_urls_processed", "URLs in a final state (done or failed for good)")
    processed.add_metric([], p.urls_by_state.get("done", 0) + p.urls_by_state.get("failed_permanent", 0))
    shards = GaugeMetricFamily("imgpipe_shards_total", "Shards of the corpus by state", labels=["state"])
    shards.add_metric(["done"], p.shards_total - p.shards_unfinished)
    shards.add_metric(["unfinished"], p.shards_unfinished)
    rate = GaugeMetricFamily(
        "imgpipe_throughput_urls_per_second", "URLs finished per second over a window", labels=["window"]
    )
    rate.add_metric(["10m"], p.rate_10m_per_s)
    rate.add_metric(["1h"], p.rate_1h_per_s)
    eta = GaugeMetricFamily("imgpipe_eta_seconds", "Seconds to finish the backlog at the recent rate (NaN: no rate)")
    eta.add_metric([], p.eta_s if p.eta_s is not None else math.nan)
    failed = CounterMetricFamily("imgpipe_url_failures", "URLs that failed for good, by error class",
                                 labels=["error_class"])  # fmt: skip
    for error_class, n in sorted(failures.items()):
        failed.add_metric([error_class], n)
    per_gpu = GaugeMetricFamily("imgpipe_gpu_images_per_second", "Images analysed per second over 10 minutes",
                                labels=["gpu"])  # fmt: skip
    for gpu, value in sorted(p.per_gpu_10m.items()):
        per_gpu.add_metric([gpu], value)
    return [urls, processed, shards, rate, eta, failed, per_gpu]


class PipelineCollector(Collector):
    """Reads the database on scrape, caching the answer for ``min_interval_s``."""

    def __init__(self, connect: Callable[[], psycopg.Connection], min_interval_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._connect = connect
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: list[Metric] | None = None
        self._read_at = -math.inf
        self._up = 0

    def _read(self) -> list[Metric]:
        with self._connect() as conn:
            return pipeline_metrics(progress(conn), failures_by_class(conn))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cached is None or self._clock() - self._read_at >= self._min_interval_s:
                try:
                    self._cached, self._up = self._read(), 1
                except psycopg.Error as exc:
                    # keep serving the last reading; imgpipe_up tells the alert rules it is stale
                    log.warning("metrics: database read failed: %s", exc)
                    self._up = 0
                self._read_at = self._clock()
            cached, up = list(self._cached or []), self._up
        yield from cached
        up_metric = GaugeMetricFamily("imgpipe_up", "1 when the last database read worked")
        up_metric.add_metric([], up)
        yield up_metric


def registry_for(database_url: str, min_interval_s: float = 15.0) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(lambda: db.connect(database_url), min_interval_s))
    return registry


def render(conn: psycopg.Connection) -> str:
    """One reading as Prometheus text (for a report or a textfile collector)."""
    registry = CollectorRegistry(auto_describe=False)
    metrics = pipeline_metrics(progress(conn), failures_by_class(conn))

    class _Once(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from metrics

    registry.register(_Once())
    return generate_latest(registry).decode()


def serve(database_url: str, host: str, port: int, min_interval_s: float = 15.0):
    """Start the exporter in a background thread; returns (server, thread) of prometheus_client."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=host, registry=registry_for(database_url, min_interval_s))


def cmd_metrics(args: argparse.Namespace) -> int:
    from imgpipe_dagster.cli import ensure_port_free

    ensure_port_free(args.host, args.port)
    url = db.resolve_database_url()
    server, _thread = serve(url, args.host, args.port, args.min_interval)
    print(f"imgpipe metrics: http://{args.host}:{server.server_port}/metrics ({db.redact(url)})", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()


def add_parser(sub: argparse._SubParsersAction) -> None:
    from imgpipe_dagster.cli import COMMANDS

    p = sub.add_parser("metrics", help="serve the pipeline's rate, backlog and errors as Prometheus /metrics")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a remote Prometheus)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--min-interval", type=float, default=15.0, help="seconds a database reading is reused")
    COMMANDS["metrics"] = cmd_metrics
