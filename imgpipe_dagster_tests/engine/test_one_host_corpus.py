"""The demo's core, end to end: a corpus served by one host (the demo's photo server), one run of the
medium profile with its files unchanged, a tiny-model GPU server on the CPU, a real PostgreSQL.

With no other host asking for room in the fetcher's look-ahead, the host's own queue is no reason to
defer its URLs: one run finishes every URL (the demo used to need several)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from imgpipe_dagster._demo_photos import render_all, serve_in_thread
from imgpipe_dagster.corpus import ingest_files
from imgpipe_dagster.demo import DEMO_FAULTS, DEMO_FORMATS, DEMO_WIDTHS, write_sample_corpus
from imgpipe_dagster.engine.runner import ShardRunner
from imgpipe_dagster.profiles import resolve
from imgpipe_dagster.settings_map import engine_settings, fetch_settings
from imgpipe_dagster.store.verify import verify


@pytest.fixture
def photo_host() -> Iterator[str]:
    render_all(list(DEMO_WIDTHS), list(DEMO_FORMATS))  # as the demo's server does before serving
    server = serve_in_thread("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_one_run_finishes_a_corpus_served_by_one_host(conn, database_url, gpu_endpoint, imgpipe_home, photo_host,
                                                       tmp_path):  # fmt: skip
    corpus = tmp_path / "sample_corpus.csv"
    n_urls = write_sample_corpus(corpus, photo_host)
    shards = ingest_files(conn, [corpus], shard_size=40).shards_added  # the demo's shards
    worker, _ = resolve("medium")
    # the deployment's policy the demo uses (its photo host is on loopback), small images for the tiny model
    fetch = fetch_settings(worker, allowed_networks=["127.0.0.0/8"], target_pixels=112 * 112)
    settings = engine_settings(worker, fetch, prompt_name="caption_short_v1")

    summary = ShardRunner(database_url, "one-host-run", shards, settings, [gpu_endpoint],
                          progress=lambda line, summary: None).run()  # fmt: skip

    report = verify(conn, shards)
    assert report.complete, (report, summary.failures_by_class, summary.urls_returned_to_pending, summary.waiting_for_retry)
    assert summary.final_count("done") == n_urls - len(DEMO_FAULTS)
    assert summary.final_count("failed_permanent") == len(DEMO_FAULTS)
    assert summary.urls_returned_to_pending == 0  # no URL deferred by its host, none given back
