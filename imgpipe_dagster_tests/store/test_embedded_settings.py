"""The embedded PostgreSQL runs with settings sized for a 20M-URL corpus (see store/embedded.py)."""

from __future__ import annotations

import os

import psycopg
import pytest

from imgpipe_dagster.store.embedded import apply_settings, tuned_settings

GiB = 2**30


def _by_name(settings) -> dict[str, int]:
    return {s.name: s.value for s in settings}


def test_shared_buffers_are_a_quarter_of_memory_within_bounds():
    # pg_settings counts shared_buffers in 8 kB pages: 128 pages a MB.
    assert _by_name(tuned_settings(8 * GiB))["shared_buffers"] == 2048 * 128
    assert _by_name(tuned_settings(GiB // 4))["shared_buffers"] == 128 * 128  # never below the stock 128 MB
    assert _by_name(tuned_settings(256 * GiB))["shared_buffers"] == 4096 * 128  # nor above 4 GB
    assert _by_name(tuned_settings(8 * GiB))["max_wal_size"] == 8192
    assert _by_name(tuned_settings(8 * GiB))["checkpoint_timeout"] == 900


@pytest.mark.skipif(bool(os.environ.get("IMGPIPE_TEST_DATABASE_URL")), reason="a server of one's own keeps its settings")
def test_the_embedded_server_runs_with_them(pg_server_url):
    with psycopg.connect(pg_server_url, dbname="postgres") as conn:
        running = dict(conn.execute("SELECT name, setting::bigint FROM pg_settings WHERE name IN "
                                    "('shared_buffers', 'max_wal_size', 'checkpoint_timeout')").fetchall())  # fmt: skip
    assert running == _by_name(tuned_settings())
    # Applied already: a second start changes nothing and needs no restart.
    assert apply_settings(pg_server_url, tuned_settings()) is False
