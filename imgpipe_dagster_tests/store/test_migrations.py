import psycopg
import pytest

from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.errors import ConfigurationError
from imgpipe_dagster.store.migrations import applied_versions, available_migrations, migrate


def test_fresh_database_has_every_migration_recorded(conn):
    assert set(applied_versions(conn)) == {m.version for m in available_migrations()}


def test_running_migrations_twice_changes_nothing(conn):
    before = conn.execute("SELECT version, checksum, applied_at FROM schema_migrations").fetchall()
    assert migrate(conn) == []
    assert conn.execute("SELECT version, checksum, applied_at FROM schema_migrations").fetchall() == before


def test_newer_migration_applies_on_top_of_existing_data(conn, tmp_path):
    conn.execute("INSERT INTO shards (shard_id, shard_no, url_count) VALUES ('s1', 1, 1)")
    conn.execute(
        "INSERT INTO corpus_urls (url_hash, url, shard_id) VALUES (decode(md5('http://a/x'), 'hex'), 'http://a/x', 's1')"
    )
    conn.commit()
    folder = tmp_path / "sql"
    folder.mkdir()
    for migration in available_migrations():
        (folder / migration.path.name).write_bytes(migration.path.read_bytes())
    (folder / "999_add_note.sql").write_text("ALTER TABLE corpus_urls ADD COLUMN note text DEFAULT 'kept';")
    applied = migrate(conn, folder)
    assert [m.version for m in applied] == [999]
    assert conn.execute("SELECT url, note FROM corpus_urls").fetchall() == [("http://a/x", "kept")]


def test_url_hash_is_the_same_in_python_and_sql(conn):
    import hashlib

    url = "https://example.com/a b/é?q=1"
    (from_sql,) = conn.execute("SELECT decode(md5(%s), 'hex')", (url,)).fetchone()
    assert bytes(from_sql) == hashlib.md5(url.encode()).digest()


def test_unreachable_database_url_gives_one_clear_line():
    with pytest.raises(ConfigurationError) as info:
        db.connect("postgresql://user:secret@127.0.0.1:1/nothing")
    message = str(info.value)
    assert "cannot connect to PostgreSQL" in message and "IMGPIPE_DATABASE_URL" in message
    assert "secret" not in message and "\n" not in message


def test_per_minute_view_counts_recent_results(conn):
    conn.execute(
        "INSERT INTO url_analysis_results (url_hash, url, shard_id, status) VALUES"
        " ('\\x01', 'http://a/1', 's', 'ok'), ('\\x02', 'http://a/2', 's', 'failed')"
    )
    rows = conn.execute("SELECT urls_processed, urls_ok, urls_failed FROM urls_processed_per_minute").fetchall()
    assert rows == [(2, 1, 1)]


def test_url_state_rejects_unknown_values(conn):
    conn.execute("INSERT INTO shards (shard_id, shard_no, url_count) VALUES ('s1', 1, 1)")
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        conn.execute(
            "INSERT INTO corpus_urls (url_hash, url, shard_id, state) VALUES ('\\x01', 'http://a', 's1', 'lost')"
        )
