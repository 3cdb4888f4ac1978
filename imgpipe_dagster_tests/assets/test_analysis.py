"""image_analysis end to end on the CPU: real Postgres, real image server, two real GPU server
processes with the tiny model (the dual-GPU layout), real Dagster runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from dagster import materialize

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.assets.checks import CHECK_COMPLETE
from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.partitions import URL_SHARDS
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster_tests.support import seed_corpus

SMALL_RUN = {
    "images_per_request": 4, "chunk_size": 5, "max_concurrent_batches": 4, "lease_seconds": 5,
    "retry_delay": 0.05, "prefetch_concurrent_downloads": 8,
}  # fmt: skip


@pytest.fixture
def gpu_servers(tiny_model_dir, imgpipe_home):
    """Managed-mode resource on two CPU 'GPUs'; the servers are stopped after the test."""
    resource = GpuModelResource(
        devices=["cpu", "cpu"], base_port=0, model_path=str(tiny_model_dir), idle_timeout_s=300,
        startup_timeout_s=300,
    )
    yield resource
    GpuServerLauncher(gpu_server_records_dir(imgpipe_home)).stop()


def resources(database_url, gpu_model):
    return {
        "postgres": PostgresResource(database_url=database_url),
        "gpu_model": gpu_model,
        "fetcher": FetcherResource(allowed_networks=["127.0.0.0/8"]),
    }


def run_config(**worker):
    return {"ops": {"image_analysis": {"config": {"profile": "medium", "worker": {**SMALL_RUN, **worker}}}}}


def test_two_shards_end_to_end(dagster_instance, database_url, conn, image_server, gpu_servers):
    good = [image_server.image_url(name, ext, width=w, n=i) for i, (name, ext, w) in enumerate(
        [("astronaut", "png", 640), ("chelsea", "jpg", 300), ("coffee", "webp", 900), ("rocket", "jpg", 1200),
         ("flower", "gif", 500), ("china", "png", 800)])]  # fmt: skip
    shards = {
        "s000001": good[:3] + [image_server.url("/fault/status/404"), image_server.url("/fault/html-as-jpeg")],
        "s000002": good[3:] + [image_server.url("/fault/status/410")],
    }
    seed_corpus(conn, shards)
    dagster_instance.add_dynamic_partitions(URL_SHARDS, list(shards))

    result = materialize(
        [image_analysis], instance=dagster_instance, resources=resources(database_url, gpu_servers),
        run_config=run_config(),
        tags={"dagster/asset_partition_range_start": "s000001", "dagster/asset_partition_range_end": "s000002"},
    )  # fmt: skip

    assert result.success
    report = verify(conn, list(shards))
    assert report.complete, report.lines()
    states = dict(conn.execute(
        "SELECT c.url, c.state::text || '/' || coalesce(r.error_class, r.status) FROM corpus_urls c"
        " JOIN url_analysis_results r USING (url_hash)").fetchall())  # fmt: skip
    assert {states[url] for url in good} == {"done/ok"}
    assert states[image_server.url("/fault/status/404")] == "failed_permanent/http_404"
    assert states[image_server.url("/fault/status/410")] == "failed_permanent/http_410"
    assert states[image_server.url("/fault/html-as-jpeg")] == "failed_permanent/not_an_image"
    rows = conn.execute(
        "SELECT width, height, format, sha256, phash, model_text, gpu, prompt_version FROM url_analysis_results"
        " WHERE status = 'ok'").fetchall()  # fmt: skip
    assert len(rows) == len(good)
    assert all(r[0] and r[1] and r[2] and len(r[3]) == 64 and r[4] is not None and r[5] is not None for r in rows)
    assert {r[6] for r in rows} <= {"gpu0", "gpu1"} and all(r[7] for r in rows)
    # each shard's materialization has its own figures (s000001: 3 good + 2 bad, s000002: 3 good + 1 bad)
    materializations = {e.materialization.partition: e.materialization.metadata
                        for e in result.get_asset_materialization_events()}  # fmt: skip
    assert sorted(materializations) == ["s000001", "s000002"]
    first, second = materializations["s000001"], materializations["s000002"]
    assert (first["urls_total"].value, first["urls_done"].value, first["urls_failed"].value) == (5, 3, 2)
    assert (second["urls_total"].value, second["urls_done"].value, second["urls_failed"].value) == (4, 3, 1)
    assert first["failures_by_class"].value == {"http_404": 1, "not_an_image": 1}
    assert second["failures_by_class"].value == {"http_410": 1}
    assert first["run_urls_done"].value == 6  # the run's sum, under its own name
    assert first["profile"].value == "medium" and first["images_per_s"].value > 0
    assert set(first["per_gpu"].value) <= {"gpu0", "gpu1"}
    assert sum(g["images"] for m in (first, second) for g in m["per_gpu"].value.values()) == 6
    sample = first["results_sample"].value.records
    assert len(sample) == 5 and {r.data["error_class"] for r in sample} == {"", "http_404", "not_an_image"}
    # one result per shard for each check, each on its partition
    evaluations = result.get_asset_check_evaluations()
    complete = {e.partition: e.passed for e in evaluations if e.check_name == CHECK_COMPLETE}
    assert complete == {"s000001": True, "s000002": True}
    assert all(e.target_materialization_data is not None for e in evaluations)


KILLABLE_RUN = textwrap.dedent("""
    import sys
    from imgpipe_dagster.engine.runner import ShardRunner
    from imgpipe_dagster.profiles import resolve
    from imgpipe_dagster.settings_map import engine_settings, medium_fetch_settings
    worker, _ = resolve("medium", {"images_per_request": 2, "chunk_size": 2, "max_concurrent_batches": 1,
                                   "lease_seconds": 5, "prefetch_concurrent_downloads": 2})
    fetch = medium_fetch_settings(allowed_networks=["127.0.0.0/8"], prefetch_concurrent_downloads=2, prefetch_queue_size=2)
    ShardRunner(sys.argv[1], "killed-run", ["s000001"], engine_settings(worker, fetch), sys.argv[2].split(",")).run()
""")


def wait_for_the_victims_sessions_to_end(conn, timeout_s: float = 30.0) -> None:
    """A COMMIT the killed run sent just before the kill still completes on the server; count its rows
    only once its sessions are gone (on a loaded machine 6 counted rows became 8 otherwise)."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn.commit()  # pg_stat_activity is read once per transaction
        (others,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
        if not others:
            return
        assert time.monotonic() < deadline, f"{others} session(s) of the killed run still open after {timeout_s}s"
        time.sleep(0.1)


def test_killed_run_resumes_with_nothing_lost_or_duplicated(
    dagster_instance, database_url, conn, image_server, gpu_servers
):
    urls = [image_server.image_url("chelsea", "jpg", width=400, n=i) for i in range(60)]
    seed_corpus(conn, {"s000001": urls})
    dagster_instance.add_dynamic_partitions(URL_SHARDS, ["s000001"])
    from imgpipe_dagster.profiles import resolve

    endpoints = gpu_servers.ensure_endpoints(resolve("medium")[1])
    victim = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, database_url, ",".join(endpoints)],
                              env=os.environ.copy())  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        (written,) = conn.execute("SELECT count(*) FROM url_analysis_results").fetchone()
        if written >= 6:
            break
        assert victim.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_for_the_victims_sessions_to_end(conn)
    (before,) = conn.execute("SELECT count(*) FROM url_analysis_results WHERE run_id = 'killed-run'").fetchone()
    assert 0 < before < len(urls)

    result = materialize([image_analysis], instance=dagster_instance, partition_key="s000001",
                         resources=resources(database_url, gpu_servers), run_config=run_config())  # fmt: skip

    assert result.success
    total, distinct_urls, by_killed = conn.execute(
        "SELECT count(*), count(DISTINCT url), count(*) FILTER (WHERE run_id = 'killed-run') FROM url_analysis_results"
    ).fetchone()
    assert total == distinct_urls == len(urls)
    assert by_killed == before, "the second run rewrote rows the killed run had finished"
    assert verify(conn, ["s000001"]).complete
