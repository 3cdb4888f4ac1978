"""The pipeline exporter: Prometheus text with conventional names, read from a seeded database."""

from __future__ import annotations

import math
import os
import re
import subprocess
import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

from imgpipe_dagster.metrics import render, serve
from imgpipe_dagster.store import database as db
from imgpipe_dagster_tests.support import seed_corpus
from imgpipe_dagster_tests.test_status import IMGPIPE, SHARDS, finish


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def seed(conn) -> None:
    seed_corpus(conn, SHARDS)
    for i, url in enumerate(SHARDS["s000001"][:4]):
        finish(conn, url, "ok", minutes_ago=i, gpu="gpu0")
    finish(conn, SHARDS["s000001"][4], "failed", minutes_ago=1, error_class="http_404", gpu=None)
    finish(conn, SHARDS["s000001"][5], "failed", minutes_ago=2, error_class="http_404", gpu=None)
    finish(conn, SHARDS["s000002"][0], "failed", minutes_ago=2, error_class="timeout", gpu=None)
    conn.commit()


def test_exporter_serves_rate_backlog_and_errors(conn, database_url):
    seed(conn)
    server, thread = serve(database_url, "127.0.0.1", 0, min_interval_s=0)  # port 0: the system picks
    try:
        response = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=30)
    finally:
        server.shutdown()
        thread.join(timeout=10)

    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    assert found[("imgpipe_up", ())] == 1
    urls = {labels[0][1]: v for (name, labels), v in found.items() if name == "imgpipe_urls_total"}
    assert urls == {"pending": 6, "leased": 0, "failed_retryable": 0, "failed_permanent": 3, "done": 4}
    assert found[("imgpipe_urls_processed_total", ())] == 7
    assert found[("imgpipe_url_failures_total", (("error_class", "http_404"),))] == 2
    assert found[("imgpipe_url_failures_total", (("error_class", "timeout"),))] == 1
    assert found[("imgpipe_throughput_urls_per_second", (("window", "10m"),))] == 7 / 600
    assert math.isclose(found[("imgpipe_eta_seconds", ())], 6 / (7 / 600))
    assert found[("imgpipe_shards_total", (("state", "unfinished"),))] == 2
    assert found[("imgpipe_gpu_images_per_second", (("gpu", "gpu0"),))] == 4 / 600


def test_empty_corpus_has_no_eta(conn):
    found = samples(render(conn))

    assert math.isnan(found[("imgpipe_eta_seconds", ())])
    assert found[("imgpipe_urls_processed_total", ())] == 0
    assert not any(name == "imgpipe_url_failures_total" for name, _ in found)


def test_the_command_on_port_0_says_the_port_it_bound(conn, database_url):
    seed(conn)
    env = os.environ | {db.DATABASE_URL_ENV: database_url}
    with subprocess.Popen([*IMGPIPE, "metrics", "--port", "0", "--min-interval", "0"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as exporter:  # fmt: skip
        try:
            first_line = _first_line(exporter, timeout_s=120)
            match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", first_line)
            assert match and match.group(1) != "0", first_line
            response = httpx.get(match.group(0), timeout=30)
        finally:
            exporter.terminate()
            exporter.wait(timeout=30)

    assert response.status_code == 200
    assert samples(response.text)[("imgpipe_urls_processed_total", ())] == 7


def _first_line(process: subprocess.Popen, timeout_s: float) -> str:
    """The process' first line of output; killed (and an empty line) if it says nothing in time."""
    deadline = threading.Timer(timeout_s, process.kill)
    deadline.start()
    try:
        return process.stdout.readline()
    finally:
        deadline.cancel()
