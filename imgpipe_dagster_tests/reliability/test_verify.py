"""`imgpipe verify` catches a results table edited by hand, and stays cheap on a large table.

The tables are brought to a consistent final state through the real outcome writer, then edited
the way a person with psql would: each edit must make `imgpipe verify` exit 1 with a line naming
the problem, while the untouched database passes with exit 0.
"""

from __future__ import annotations

import hashlib

import pytest

from imgpipe_dagster import cli
from imgpipe_dagster.store import database as db
from imgpipe_dagster.store import work
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster.store.work import UrlOutcome
from imgpipe_dagster_tests.support import seed_corpus

URLS = [f"http://images.example/{n}.jpg" for n in range(12)]


def _hash(url: str) -> bytes:
    return hashlib.md5(url.encode()).digest()


def _finish_all(conn, urls: list[str], shard: str = "s000001", owner: str = "run-1") -> None:
    """Claim every URL and write a final outcome for it: even ones done, odd ones failed_permanent."""
    claimed = work.claim(conn, owner, [shard], len(urls), 60)
    assert len(claimed) == len(urls)
    outcomes = []
    for c in claimed:
        n = int(c.url.rsplit("/", 1)[1].split(".")[0])
        if n % 2 == 0:
            outcomes.append(UrlOutcome(c.url_hash, c.url, c.shard_id, "done", 1, result={"model_text": "a cat"}))
        else:
            outcomes.append(UrlOutcome(c.url_hash, c.url, c.shard_id, "failed_permanent", 1, "http_404", "404"))
    assert work.write_outcomes(conn, owner, outcomes) == (len(urls), len(urls))


@pytest.fixture
def finished(conn, database_url, monkeypatch):
    seed_corpus(conn, {"s000001": URLS})
    _finish_all(conn, URLS)
    monkeypatch.setenv(db.DATABASE_URL_ENV, database_url)
    return conn


def _imgpipe_verify(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["verify", *args])
    return code, capsys.readouterr().out


def test_untouched_results_pass(finished, capsys):
    code, out = _imgpipe_verify(capsys, "--require-complete")
    assert code == 0, out
    assert f"URLs: {len(URLS)}, in a final state: {len(URLS)}" in out
    assert out.strip().splitlines()[-1] == "OK"


# (edit, SQL applied by hand, the line verify must print)
HAND_EDITS = [
    ("a result row deleted",
     "DELETE FROM url_analysis_results WHERE url = %(done)s",
     "INCONSISTENT done/no result row: 1 URLs"),
    ("a done URL's state changed to failed_permanent",
     "UPDATE corpus_urls SET state = 'failed_permanent' WHERE url = %(done)s",
     "INCONSISTENT failed_permanent/ok: 1 URLs"),
    ("a finished URL put back to pending, its result row kept",
     "UPDATE corpus_urls SET state = 'pending' WHERE url = %(failed)s",
     "INCONSISTENT pending/failed: 1 URLs"),
    ("a result status flipped from ok to failed",
     "UPDATE url_analysis_results SET status = 'failed' WHERE url = %(done)s",
     "INCONSISTENT done/failed: 1 URLs"),
    ("a result status flipped from failed to ok",
     "UPDATE url_analysis_results SET status = 'ok' WHERE url = %(failed)s",
     "INCONSISTENT failed_permanent/ok: 1 URLs"),
    ("an orphan result row added",
     "INSERT INTO url_analysis_results (url_hash, url, shard_id, status)"
     " VALUES (%(orphan_hash)s, 'http://nowhere.example/x.jpg', 's000001', 'ok')",
     "INCONSISTENT result rows without a corpus URL: 1"),
    ("a corpus URL deleted (its result row is left orphaned)",
     "DELETE FROM corpus_urls WHERE url = %(done)s",
     "INCONSISTENT result rows without a corpus URL: 1"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "statement", "expected_line"), HAND_EDITS, ids=[e[0] for e in HAND_EDITS])
def test_hand_edit_is_detected(finished, capsys, edit, statement, expected_line):
    params = {"done": URLS[0], "failed": URLS[1], "orphan_hash": _hash("http://nowhere.example/x.jpg")}
    finished.execute(statement, params)
    finished.commit()

    code, out = _imgpipe_verify(capsys)

    assert code == 1, f"{edit}: verify passed:\n{out}"
    assert expected_line in out.splitlines(), out
    assert out.strip().splitlines()[-1] == "FAILED"


def test_inconsistent_urls_are_named(finished, capsys):
    finished.execute("DELETE FROM url_analysis_results WHERE url = %s", (URLS[4],))
    finished.commit()
    _code, out = _imgpipe_verify(capsys)
    assert f"  e.g. {URLS[4]}: state done, result missing" in out.splitlines()


def test_shard_filter_limits_the_check(finished, conn, capsys):
    seed_corpus_second = [f"http://images.example/b{n}.jpg" for n in range(3)]
    conn.execute("INSERT INTO shards (shard_id, shard_no, url_count) VALUES ('s000002', 2, 3)")
    for line, url in enumerate(seed_corpus_second, start=1):
        conn.execute("INSERT INTO corpus_urls (url_hash, url, shard_id, source_line) VALUES (%s, %s, 's000002', %s)",
                     (_hash(url), url, line))  # fmt: skip
    conn.execute("UPDATE url_analysis_results SET status = 'failed' WHERE url = %s", (URLS[0],))
    conn.commit()

    code, out = _imgpipe_verify(capsys, "--shard", "s000002")
    assert code == 0 and "not final yet: pending=3" in out and "INCONSISTENT" not in out
    code, out = _imgpipe_verify(capsys, "--shard", "s000002", "--require-complete")
    assert code == 1
    code, out = _imgpipe_verify(capsys, "--shard", "s000001")
    assert code == 1 and "INCONSISTENT done/failed: 1 URLs" in out


def test_unfinished_work_is_ok_but_not_complete(conn, database_url, monkeypatch, capsys):
    seed_corpus(conn, {"s000001": URLS})
    work.claim(conn, "run-1", ["s000001"], 3, 60)
    monkeypatch.setenv(db.DATABASE_URL_ENV, database_url)
    code, out = _imgpipe_verify(capsys)
    assert code == 0 and "not final yet: leased=3, pending=9" in out
    assert _imgpipe_verify(capsys, "--require-complete")[0] == 1


class _CountingConnection:
    """Passes statements through and counts the rows they hand to Python."""

    def __init__(self, conn):
        self._conn = conn
        self.rows_fetched = 0
        self.statements = 0

    def execute(self, *args, **kwargs):
        self.statements += 1
        return _CountingCursor(self, self._conn.execute(*args, **kwargs))


class _CountingCursor:
    def __init__(self, owner: _CountingConnection, cursor):
        self._owner, self._cursor = owner, cursor

    def fetchall(self):
        rows = self._cursor.fetchall()
        self._owner.rows_fetched += len(rows)
        return rows

    def fetchone(self):
        row = self._cursor.fetchone()
        self._owner.rows_fetched += row is not None
        return row


def test_verify_aggregates_in_the_database(conn):
    """Production tables hold 20M+ rows: verify must count in SQL, never pull rows into Python."""
    urls = [f"http://images.example/big/{n}.jpg" for n in range(30_000)]
    seed_corpus(conn, {"s000001": urls[:15_000], "s000002": urls[15_000:]})
    conn.execute(
        "INSERT INTO url_analysis_results (url_hash, url, shard_id, status)"
        " SELECT url_hash, url, shard_id, 'ok' FROM corpus_urls WHERE source_line % 3 <> 0"
    )
    conn.execute("UPDATE corpus_urls SET state = 'done' WHERE source_line % 3 <> 0")
    conn.execute("UPDATE url_analysis_results SET status = 'failed' WHERE url = %s", (urls[1],))
    conn.commit()
    counting = _CountingConnection(conn)

    report = verify(counting)

    assert report.urls == 30_000 and report.inconsistent == {"done/failed": 1}
    assert report.unfinished == {"pending": 10_000}
    # a handful of (state, status) groups, one count and the few examples: independent of table size
    assert counting.rows_fetched <= 20 and counting.statements <= 3
