"""Seeding helpers and a stand-in GPU /health server for the sensor tests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dagster import DagsterRunStatus
from dagster._core.test_utils import create_run_for_test

from imgpipe_dagster.partitions import URL_SHARDS


def shard_id(number: int) -> str:
    return f"s{number:06d}"


def seed_shards(conn, instance, count: int, urls_per_shard: int = 5, state: str = "pending") -> list[str]:
    """``count`` shards of ``urls_per_shard`` URLs each, also registered as dynamic partitions."""
    conn.execute(
        "INSERT INTO shards (shard_id, shard_no, url_count)"
        " SELECT 's' || lpad(n::text, 6, '0'), n, %(per)s FROM generate_series(1, %(count)s) n",
        {"count": count, "per": urls_per_shard},
    )
    conn.execute(
        "INSERT INTO corpus_urls (url_hash, url, shard_id, state)"
        " SELECT decode(md5(u), 'hex'), u, shard, %(state)s::url_state FROM ("
        "   SELECT 'http://img.test/' || n || '/' || i || '.jpg' AS u, 's' || lpad(n::text, 6, '0') AS shard"
        "     FROM generate_series(1, %(count)s) n, generate_series(1, %(per)s) i) x",
        {"count": count, "per": urls_per_shard, "state": state},
    )
    conn.commit()
    shards = [shard_id(n) for n in range(1, count + 1)]
    if instance is not None:
        instance.add_dynamic_partitions(URL_SHARDS, shards)
    return shards


def seed_results(
    conn, ok: int, failed: int = 0, error_class: str = "http_404", inference_ms: float = 800.0,
    download_ms: float = 300.0, age_s: float = 30.0,
) -> None:  # fmt: skip
    """Recent result rows (created ``age_s`` ago) as a run would have written them."""
    conn.execute(
        "INSERT INTO url_analysis_results (url_hash, url, shard_id, status, created_at, error_class,"
        " inference_ms, download_ms)"
        " SELECT decode(md5('r' || n || random()), 'hex'), 'http://r.test/' || n, 's000001',"
        "        CASE WHEN n <= %(ok)s THEN 'ok' ELSE 'failed' END, now() - make_interval(secs => %(age)s),"
        "        CASE WHEN n <= %(ok)s THEN NULL ELSE %(cls)s END,"
        "        CASE WHEN n <= %(ok)s THEN %(inf)s END, %(dl)s"
        " FROM generate_series(1, %(total)s) n",
        {"ok": ok, "total": ok + failed, "cls": error_class, "inf": inference_ms, "dl": download_ms,
         "age": age_s},
    )  # fmt: skip
    conn.commit()


def clear_results(conn) -> None:
    conn.execute("DELETE FROM url_analysis_results")
    conn.commit()


def add_run(instance, job_name: str, shard: str, status=DagsterRunStatus.STARTED, profile: str = "medium"):
    return create_run_for_test(
        instance, job_name=job_name, status=status,
        tags={"dagster/partition": shard, "imgpipe/profile": profile, "imgpipe/kind": "shard_run"},
    )  # fmt: skip


class HealthServer:
    """A real HTTP server on 127.0.0.1 answering /health like a GPU server does."""

    def __init__(self, status: str = "ready", queue_size: int = 0, queue_capacity: int = 1024):
        self.body = {"status": status, "queue_size": queue_size, "queue_capacity": queue_capacity,
                     "workers": 1, "memory": {"allocated_mb": 1.0}}  # fmt: skip
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                payload = json.dumps(outer.body).encode()
                self.send_response(200 if outer.body["status"] != "failed" else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HealthServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
