"""The embedded PostgreSQL runs with settings sized for a 20M-URL corpus (see store/embedded.py)."""

from __future__ import annotations

import os

import psycopg
import pytest

from imgpipe_dagster.environment import PG_SHARED_BUFFERS_ENV
from imgpipe_dagster.store.embedded import apply_settings, tuned_settings
from imgpipe_dagster.store.errors import ConfigurationError

GiB = 2**30


def test_shared_buffers_are_a_quarter_of_memory_within_bounds(monkeypatch):
    monkeypatch.delenv(PG_SHARED_BUFFERS_ENV, raising=False)
    # pg_settings counts shared_buffers in 8 kB pages: 128 pages a MB.
    assert tuned_settings(4 * GiB)["shared_buffers"] == 1024 * 128
    assert tuned_settings(GiB // 4)["shared_buffers"] == 128 * 128  # never below the stock 128 MB
    assert tuned_settings(256 * GiB)["shared_buffers"] == 1536 * 128  # nor above 1.5 GB
    assert tuned_settings(8 * GiB)["max_wal_size"] == 8192
    assert tuned_settings(8 * GiB)["checkpoint_timeout"] == 900


def test_a_larger_corpus_can_ask_for_more_buffers(monkeypatch):
    monkeypatch.setenv(PG_SHARED_BUFFERS_ENV, "6144")
    assert tuned_settings(8 * GiB)["shared_buffers"] == 6144 * 128
    for bad in ("lots", "-5", "8"):
        monkeypatch.setenv(PG_SHARED_BUFFERS_ENV, bad)
        with pytest.raises(ConfigurationError, match=PG_SHARED_BUFFERS_ENV):
            tuned_settings()


@pytest.mark.skipif(bool(os.environ.get("IMGPIPE_TEST_DATABASE_URL")), reason="a server of one's own keeps its settings")
def test_the_embedded_server_runs_with_them(pg_server_url):
    with psycopg.connect(pg_server_url, dbname="postgres") as conn:
        running = dict(conn.execute("SELECT name, setting::bigint FROM pg_settings WHERE name IN "
                                    "('shared_buffers', 'max_wal_size', 'checkpoint_timeout')").fetchall())  # fmt: skip
    assert running == tuned_settings()
    # Applied already: a second start changes nothing and needs no restart.
    assert apply_settings(pg_server_url, tuned_settings()) is False


def test_a_running_server_is_never_restarted_by_a_process_that_attaches(tmp_path, monkeypatch):
    from imgpipe_dagster.store.embedded import EmbeddedPostgres

    def shared_buffers(url: str) -> str:
        with psycopg.connect(url, dbname="postgres") as conn:
            return conn.execute("SHOW shared_buffers").fetchone()[0]

    server = EmbeddedPostgres(tmp_path / "pg")
    monkeypatch.setenv(PG_SHARED_BUFFERS_ENV, "128")
    try:
        url = server.start()
        first_pid = server.status().pid
        assert shared_buffers(url) == "128MB"
        # Another process with other settings attaches: the server others use keeps running as it is.
        monkeypatch.setenv(PG_SHARED_BUFFERS_ENV, "256")
        url = server.start()
        assert server.status().pid == first_pid
        assert shared_buffers(url) == "128MB"
        # The change applies when a process starts the server.
        server.stop()
        url = server.start()
        assert shared_buffers(url) == "256MB"
    finally:
        server.stop()
