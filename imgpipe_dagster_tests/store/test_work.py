"""Leases and exactly-once outcome writes against a real PostgreSQL."""

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from imgpipe_dagster.store.work import (
    UrlOutcome,
    claim,
    leftover,
    release_leases,
    renew_leases,
    shard_state_counts,
    write_outcomes,
    write_outcomes_executemany,
)


def seed(conn, shard="s000001", n=10):
    conn.execute("INSERT INTO shards (shard_id, shard_no, url_count) VALUES (%s, 1, %s)", (shard, n))
    with conn.cursor().copy("COPY corpus_urls (url_hash, url, shard_id) FROM STDIN") as copy:
        for i in range(n):
            url = f"http://img.test/{i}.jpg"
            copy.write_row((hashlib.md5(url.encode()).digest(), url, shard))
    conn.commit()


def outcome(c, state, **result):
    return UrlOutcome(c.url_hash, c.url, c.shard_id, state, c.attempts + (state != "pending"), result=result)


def test_two_owners_never_claim_the_same_url(conn):
    seed(conn, n=10)
    first = claim(conn, "run-a", ["s000001"], 6, 60)
    second = claim(conn, "run-b", ["s000001"], 6, 60)
    assert len(first) == 6 and len(second) == 4
    assert not {c.url_hash for c in first} & {c.url_hash for c in second}
    assert claim(conn, "run-c", ["s000001"], 6, 60) == []


def test_outcomes_move_state_and_write_one_result_row_per_final_url(conn):
    seed(conn, n=4)
    claimed = claim(conn, "run-a", ["s000001"], 4, 60)
    outcomes = [
        outcome(claimed[0], "done", model_text="a cat", analysis={"caption": "a cat"}, width=640, height=480),
        outcome(claimed[1], "failed_permanent", http_status=404),
        outcome(claimed[2], "failed_retryable"),
        outcome(claimed[3], "pending"),
    ]
    outcomes[1].error_class = "http_404"
    assert write_outcomes(conn, "run-a", outcomes) == (4, 2)
    counts = shard_state_counts(conn, ["s000001"])
    assert counts["done"] == counts["failed_permanent"] == counts["failed_retryable"] == counts["pending"] == 1
    rows = conn.execute("SELECT status, analysis, error_class, run_id FROM url_analysis_results ORDER BY status").fetchall()
    assert rows == [("failed", None, "http_404", "run-a"), ("ok", {"caption": "a cat"}, None, "run-a")]


def test_a_run_that_lost_its_lease_writes_nothing(conn):
    seed(conn, n=1)
    (mine,) = claim(conn, "run-a", ["s000001"], 1, 60)
    conn.execute("UPDATE corpus_urls SET lease_expires_at = now() - interval '1 second'")
    conn.commit()
    (theirs,) = claim(conn, "run-b", ["s000001"], 1, 60)
    assert theirs.url_hash == mine.url_hash
    assert write_outcomes(conn, "run-a", [outcome(mine, "done", model_text="late")]) == (0, 0)
    assert write_outcomes(conn, "run-b", [outcome(theirs, "done", model_text="on time")]) == (1, 1)
    assert conn.execute("SELECT model_text, run_id FROM url_analysis_results").fetchall() == [("on time", "run-b")]


def test_release_returns_leases_to_pending_without_spending_attempts(conn):
    seed(conn, n=3)
    claim(conn, "run-a", ["s000001"], 3, 60)
    assert renew_leases(conn, "run-a", 120) == 3
    assert release_leases(conn, "run-a") == 3
    assert conn.execute("SELECT DISTINCT state::text, attempts FROM corpus_urls").fetchall() == [("pending", 0)]


def test_retryable_url_waits_for_its_backoff(conn):
    from datetime import UTC, datetime, timedelta

    seed(conn, n=1)
    (c,) = claim(conn, "run-a", ["s000001"], 1, 60)
    later = outcome(c, "failed_retryable")
    later.next_attempt_at = datetime.now(UTC) + timedelta(hours=1)
    write_outcomes(conn, "run-a", [later])
    assert claim(conn, "run-a", ["s000001"], 1, 60) == []
    conn.execute("UPDATE corpus_urls SET next_attempt_at = now() - interval '1 second'")
    conn.commit()
    assert len(claim(conn, "run-a", ["s000001"], 1, 60)) == 1


@pytest.mark.parametrize("writer", [write_outcomes, write_outcomes_executemany])
def test_both_writers_agree_and_text_round_trips(conn, writer):
    seed(conn, n=2)
    claimed = claim(conn, "run-a", ["s000001"], 2, 60)
    text = 'quote " backslash \\ tab \t emoji 🐈 rtl שלום nul\x00end'
    writer(conn, "run-a", [outcome(c, "done", model_text=text, analysis={"t": text.replace("\x00", "")}) for c in claimed])
    stored = conn.execute("SELECT model_text FROM url_analysis_results").fetchall()
    assert stored == [(text.replace("\x00", ""),)] * 2


def test_due_retries_are_claimed_before_fresh_urls(conn):
    seed(conn, n=10)
    first = claim(conn, "run-a", ["s000001"], 2, 60)
    retries = [outcome(c, "failed_retryable") for c in first]
    write_outcomes(conn, "run-a", retries)  # next_attempt_at NULL: due at once
    again = claim(conn, "run-a", ["s000001"], 3, 60)
    assert {c.url_hash for c in first} <= {c.url_hash for c in again}
    assert sorted(c.attempts for c in again) == [0, 1, 1]


def test_a_deferred_url_waits_for_its_due_time_without_spending_an_attempt(conn):
    seed(conn, n=2)
    later, now = claim(conn, "run-a", ["s000001"], 2, 60)
    deferred = [outcome(later, "pending"), outcome(now, "pending")]
    deferred[0].next_attempt_at = datetime.now(UTC) + timedelta(hours=1)
    deferred[1].next_attempt_at = datetime.now(UTC) - timedelta(seconds=1)
    assert write_outcomes(conn, "run-a", deferred) == (2, 0)

    left = leftover(conn, ["s000001"])
    assert (left.claimable, left.waiting, left.leased) == (1, 1, 0)
    assert left.next_due_at == left.last_due_at == deferred[0].next_attempt_at
    (claimed,) = claim(conn, "run-b", ["s000001"], 2, 60)
    assert claimed.url_hash == now.url_hash and claimed.attempts == now.attempts == 0
