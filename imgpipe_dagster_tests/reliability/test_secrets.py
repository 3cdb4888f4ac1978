"""The database password never shows: not in error messages, logs, CLI output, or Dagster's records.

Against a closed port (every error path) and against the real server (the embedded server trusts
local connections, so a password in the URL is accepted and ignored: the success paths run with it).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from dagster import materialize

from imgpipe_dagster import cli
from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.partitions import URL_SHARDS
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.errors import ConfigurationError
from imgpipe_dagster_tests.support import refused_port, seed_corpus

PASSWORD = "Sup3r-s3cret-pw"


def with_password(url: str, password: str = PASSWORD) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    with refused_port() as port:
        yield f"postgresql://imgpipe:{PASSWORD}@127.0.0.1:{port}/imgpipe"


def _everything_said(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_redact_hides_the_password():
    assert PASSWORD not in db.redact(f"postgresql://u:{PASSWORD}@h:5432/d")
    assert db.redact(f"postgresql://u:{PASSWORD}@h:5432/d") == "postgresql://u:***@h:5432/d"


def test_connect_error_names_the_server_not_the_password(closed_port_url, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigurationError) as raised:
        db.connect(closed_port_url)
    message = str(raised.value)
    assert "127.0.0.1" in message and "***" in message
    assert PASSWORD not in _everything_said(raised.value)
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize("command", [["verify"], ["db", "migrate"], ["db", "url"]])
def test_cli_errors_hide_the_password(closed_port_url, monkeypatch, capsys, caplog, command):
    monkeypatch.setenv(db.DATABASE_URL_ENV, closed_port_url)
    caplog.set_level(logging.DEBUG)

    code = cli.main(command)

    out, err = capsys.readouterr()
    assert code == (0 if command == ["db", "url"] else 2), out + err  # 2: a one-line error, no traceback
    assert "***" in out + err
    assert PASSWORD not in out + err + caplog.text


def test_db_url_prints_the_password_only_when_asked(closed_port_url, monkeypatch, capsys):
    monkeypatch.setenv(db.DATABASE_URL_ENV, closed_port_url)
    assert cli.main(["db", "url"]) == 0
    assert PASSWORD not in capsys.readouterr().out
    assert cli.main(["db", "url", "--show-password"]) == 0
    assert PASSWORD in capsys.readouterr().out


def _dagster_records(instance, run_id: str) -> str:
    """Everything Dagster stored about a run: its record, config, tags and every event."""
    run = instance.get_run_by_id(run_id)
    events = instance.all_logs(run_id)
    return "\n".join([repr(run), repr(run.run_config), repr(run.tags), *(repr(e) for e in events)])


def _materialize(instance, postgres: PostgresResource, shard: str):
    with refused_port() as gpu_port:
        return _materialize_with(instance, postgres, shard, f"http://127.0.0.1:{gpu_port}")


def _materialize_with(instance, postgres: PostgresResource, shard: str, gpu_endpoint: str):
    return materialize(
        [image_analysis], instance=instance, partition_key=shard, raise_on_error=False,
        resources={
            "postgres": postgres,
            # nothing reaches the GPU stage: every URL of the shard is already final or unreachable
            "gpu_model": GpuModelResource(mode="external", endpoints=[gpu_endpoint]),
            "fetcher": FetcherResource(),
        },
        run_config={"ops": {"image_analysis": {"config": {"profile": "medium", "worker": {"lease_seconds": 5}}}}},
    )  # fmt: skip


def test_a_real_run_never_records_the_password(dagster_instance, database_url, conn, monkeypatch, caplog):
    """A run with the password in IMGPIPE_DATABASE_URL: logs, metadata and events stay clean."""
    secret_url = with_password(database_url)
    monkeypatch.setenv(db.DATABASE_URL_ENV, secret_url)
    caplog.set_level(logging.DEBUG)
    # blocked addresses fail at once and permanently: the run ends without a GPU
    seed_corpus(conn, {"s000001": ["http://10.0.0.1/a.jpg", "http://169.254.169.254/latest/meta-data/"]})
    dagster_instance.add_dynamic_partitions(URL_SHARDS, ["s000001"])

    result = _materialize(dagster_instance, PostgresResource(), "s000001")

    assert result.success
    (done,) = conn.execute("SELECT count(*) FROM url_analysis_results WHERE error_class = 'blocked_address'").fetchone()
    assert done == 2  # the password-bearing URL really was used
    assert PASSWORD not in _dagster_records(dagster_instance, result.run_id)
    assert PASSWORD not in caplog.text


def test_a_failed_run_never_records_the_password(dagster_instance, closed_port_url, caplog):
    """The database is unreachable: the run fails with a message naming the server, not the password."""
    dagster_instance.add_dynamic_partitions(URL_SHARDS, ["s000001"])
    caplog.set_level(logging.DEBUG)

    result = _materialize(dagster_instance, PostgresResource(database_url=closed_port_url), "s000001")

    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "cannot connect to PostgreSQL" in message and "***" in message
    records = _dagster_records(dagster_instance, result.run_id)
    assert "cannot connect to PostgreSQL" in records
    assert PASSWORD not in records and PASSWORD not in message
    assert PASSWORD not in caplog.text
