"""Dagster's url_shards partitions always equal the shards table: through the asset, the CLI and
sync_shard_partitions, after an ingest, a re-ingest, an append and a failed ingest."""

from __future__ import annotations

import json

import pytest
from dagster import AssetCheckKey, AssetKey, materialize

from imgpipe_dagster.assets.corpus import url_corpus
from imgpipe_dagster.corpus import ingest_files, sync_shard_partitions
from imgpipe_dagster.corpus.shards import shard_ids
from imgpipe_dagster.partitions import url_shards
from imgpipe_dagster.resources import PostgresResource

URLS = [f"https://cdn{i % 3}.example.org/a/{i}.png" for i in range(60)]


def partitions(instance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(url_shards.name))


def table_shards(conn) -> list[str]:
    ids = shard_ids(conn)
    conn.rollback()
    return sorted(ids)


def test_sync_after_ingest_reingest_and_append(conn, dagster_instance, urls_file):
    first = urls_file("first.csv", [{"url": u, "id": i} for i, u in enumerate(URLS[:40])])
    ingest_files(conn, [first], shard_size=15)
    assert sync_shard_partitions(dagster_instance, conn) == ["s000001", "s000002", "s000003"]
    assert partitions(dagster_instance) == table_shards(conn)

    ingest_files(conn, [first], shard_size=15)  # re-ingest: nothing new
    assert sync_shard_partitions(dagster_instance, conn) == []
    assert partitions(dagster_instance) == table_shards(conn)

    ingest_files(conn, [urls_file("second.txt", URLS[30:])], shard_size=15)  # append: 20 new URLs
    assert sync_shard_partitions(dagster_instance, conn) == ["s000004", "s000005"]
    assert partitions(dagster_instance) == table_shards(conn) == [f"s00000{n}" for n in range(1, 6)]


def test_remove_stale_partitions(conn, dagster_instance, urls_file):
    dagster_instance.add_dynamic_partitions(url_shards.name, ["s000099"])
    ingest_files(conn, [urls_file("a.txt", URLS[:5])])
    sync_shard_partitions(dagster_instance, conn, remove_stale=True)
    assert partitions(dagster_instance) == table_shards(conn) == ["s000001"]


def _run(instance, **config):
    return materialize([url_corpus], instance=instance, resources={"postgres": PostgresResource()},
                       run_config={"ops": {"url_corpus": {"config": config}}}, raise_on_error=False)


def test_asset_registers_partitions_and_reports_figures(conn, dagster_instance, urls_file, tmp_path):
    urls_file("a.txt", URLS[:25] + ["ftp://nope/x", "https://u:p@h.com/"])
    urls_file("b.txt", URLS[20:50])
    result = _run(dagster_instance, glob=str(tmp_path / "*.txt"), shard_size=10)
    assert result.success
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("url_corpus")[0].metadata.items()}
    assert (metadata["rows_read"], metadata["valid"], metadata["urls_added"], metadata["duplicates"]) == (57, 55, 50, 5)
    assert metadata["rejected_by_reason"] == {"unsupported_scheme": 1, "credentials": 1}
    assert metadata["shards_added"] == metadata["partitions_added"] == 6  # 25 -> 3 shards, 25 new -> 3 shards
    assert (metadata["corpus_urls"], metadata["corpus_shards"], metadata["corpus_files"]) == (50, 6, 2)
    assert [(c.check_name, c.passed) for c in result.get_asset_check_evaluations()] == [
        ("partitions_match_shards", True)
    ]
    assert metadata["urls_per_s"] > 0 and metadata["elapsed_s"] > 0
    assert partitions(dagster_instance) == table_shards(conn)

    again = _run(dagster_instance, paths=[str(tmp_path / "a.txt")], shard_size=10)
    assert again.success
    assert partitions(dagster_instance) == table_shards(conn)


def test_asset_failure_is_one_line_and_partitions_still_match(conn, dagster_instance, urls_file, tmp_path):
    good = urls_file("good.txt", URLS[:12])
    bad = tmp_path / "bad.csv"
    bad.write_text("link\nhttps://a.com/x.png\n")
    result = _run(dagster_instance, paths=[str(good), str(bad)], shard_size=10)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "bad.csv: no column named 'url'; the header has 'link'" in failure.description
    assert table_shards(conn) == ["s000001", "s000002"]  # the good file committed before the bad one
    assert partitions(dagster_instance) == table_shards(conn)


def test_cli_ingest_registers_partitions_in_dagster_home(conn, dagster_instance, urls_file, monkeypatch, capsys):
    from imgpipe_dagster import cli

    # DAGSTER_HOME's instance is the test instance (same storage).
    monkeypatch.setattr("dagster.DagsterInstance.get", lambda: _Borrowed(dagster_instance))
    path = urls_file("cli.jsonl", [{"url": u, "n": i} for i, u in enumerate(URLS)])
    assert cli.main(["ingest", str(path), "--shard-size", "25", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 60 and report["shards_added"] == ["s000001", "s000002", "s000003"]
    assert report["partitions_added"] == 3
    assert partitions(dagster_instance) == table_shards(conn)
    # url_corpus shows materialized, with the metadata a UI ingest records, and its check evaluated
    key = AssetKey("url_corpus")
    materialization = dagster_instance.get_latest_materialization_event(key).asset_materialization
    assert materialization.metadata["urls_added"].value == 60 and materialization.metadata["shards_added"].value == 3
    assert materialization.tags["imgpipe/source"] == "cli"
    (check,) = dagster_instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(key, "partitions_match_shards"), limit=5)  # fmt: skip
    assert check.status.value == "SUCCEEDED"

    assert cli.main(["ingest", str(path)]) == 0  # re-ingest: skipped
    assert "already ingested" in capsys.readouterr().out
    assert cli.main(["ingest", str(path.parent / "missing.txt")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.txt: file not found")
    assert partitions(dagster_instance) == table_shards(conn)


def test_cli_ingest_takes_the_url_column_by_the_readme_name(conn, dagster_instance, urls_file, monkeypatch, capsys):
    from imgpipe_dagster import cli

    monkeypatch.setattr("dagster.DagsterInstance.get", lambda: _Borrowed(dagster_instance))
    path = urls_file("links.jsonl", [{"link": u} for u in URLS[:5]])
    assert cli.main(["ingest", str(path), "--url-column", "link", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 5


def _prepare_without_dagster_database(url: str) -> None:
    from imgpipe_dagster.store import database as db
    from imgpipe_dagster.store.migrations import migrate

    db.ensure_database(url)
    with db.connect(url) as conn:
        migrate(conn)


class _Borrowed:
    """The fixture's instance behind DagsterInstance.get(), without closing it on exit."""

    def __init__(self, instance):
        self.instance = instance

    def __enter__(self):
        return self.instance

    def __exit__(self, *exc):
        return False


@pytest.fixture(autouse=True)
def _project_home(imgpipe_home):
    return imgpipe_home
