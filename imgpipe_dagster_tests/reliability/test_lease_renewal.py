"""Lease renewal never waits on (or deadlocks with) an outcome write of the same run.

The heartbeat renews every lease of a run while the run's writers move some of those URLs out of
the lease. Renewal that waited for the writers' row locks, meeting them in another order than a
writer meets its chunk, deadlocked (PostgreSQL aborted one side after deadlock_timeout: seen in the
soak as "writing N outcomes failed (DeadlockDetected)"). Rows being written are leaving the lease,
so renewal skips them.
"""

from __future__ import annotations

from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.work import claim, renew_leases
from imgpipe_dagster_tests.support import seed_corpus


def test_renewal_skips_rows_an_outcome_write_holds(conn, database_url):
    seed_corpus(conn, {"s000001": [f"http://images.example/{n}.jpg" for n in range(10)]})
    leased = claim(conn, "run-a", ["s000001"], 10, 60)
    writing = [c.url_hash for c in leased[:4]]

    with db.connect(database_url) as writer, db.connect(database_url) as heartbeat:
        # a writer's transaction, still open, holding four of the run's leased rows
        writer.execute("UPDATE corpus_urls SET state = 'done' WHERE url_hash = ANY(%s)", (writing,))
        # a guard, not a timing: blocking on the writer's locks would raise instead of hanging the test
        heartbeat.execute("SET statement_timeout = '20s'")

        renewed = renew_leases(heartbeat, "run-a", 300)

        writer.commit()
    assert renewed == 6
    longer = conn.execute(
        "SELECT count(*) FROM corpus_urls WHERE state = 'leased' AND lease_expires_at > now() + interval '200 seconds'"
    ).fetchone()[0]
    assert longer == 6


def test_renewal_extends_every_lease_when_nothing_is_being_written(conn):
    seed_corpus(conn, {"s000001": [f"http://images.example/{n}.jpg" for n in range(5)]})
    claim(conn, "run-a", ["s000001"], 5, 60)
    claim(conn, "run-b", ["s000001"], 5, 60)
    assert renew_leases(conn, "run-a", 300) == 5
    assert renew_leases(conn, "run-b", 300) == 0
