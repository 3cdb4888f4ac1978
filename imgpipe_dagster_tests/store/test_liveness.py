"""store/liveness.py on a real Postgres: which runs are dead, read from heartbeats and URL leases only."""

from __future__ import annotations

from imgpipe_dagster.store import liveness
from imgpipe_dagster_tests.support import seed_corpus


def _lease(conn, owner: str, shard: str, expires_in_s: float) -> None:
    conn.execute(
        "UPDATE corpus_urls SET state = 'leased', lease_owner = %s,"
        " lease_expires_at = now() + make_interval(secs => %s) WHERE shard_id = %s",
        (owner, expires_in_s, shard),
    )
    conn.commit()


def test_a_run_whose_heartbeat_expired_is_dead_and_a_beating_one_is_not(conn):
    liveness.beat(conn, "alive", ["s1"], ttl_s=60)
    liveness.beat(conn, "gone", ["s2"], ttl_s=60)
    conn.execute("UPDATE run_heartbeats SET expires_at = now() - interval '5 seconds' WHERE run_id = 'gone'")
    conn.commit()

    dead = liveness.dead_runs(conn, ["alive", "gone", "never-seen"])
    assert [d.run_id for d in dead] == ["gone"]
    assert dead[0].evidence == "heartbeat" and dead[0].pid is not None
    assert "heartbeat stopped being renewed" in dead[0].describe()
    # within the grace it is not dead yet
    assert liveness.dead_runs(conn, ["gone"], grace_s=60) == []


def test_without_a_heartbeat_expired_url_leases_are_the_evidence(conn):
    seed_corpus(conn, {"s1": [f"http://h/{i}" for i in range(3)], "s2": [f"http://h/b{i}" for i in range(2)]})
    _lease(conn, "old-run", "s1", expires_in_s=-10)
    _lease(conn, "busy-run", "s2", expires_in_s=60)

    dead = liveness.dead_runs(conn, ["old-run", "busy-run"])
    assert [(d.run_id, d.evidence, d.leased_urls) for d in dead] == [("old-run", "leases", 3)]

    assert liveness.reclaim(conn, "old-run") == 3
    states = conn.execute("SELECT state::text, count(*), max(attempts) FROM corpus_urls WHERE shard_id = 's1'"
                          " GROUP BY 1").fetchall()  # fmt: skip
    assert states == [("pending", 3, 0)]  # back in the pool, no retry spent
    assert liveness.dead_runs(conn, ["old-run"]) == []


def test_an_ended_heartbeat_and_no_leases_is_not_evidence(conn):
    liveness.beat(conn, "finished", ["s1"], ttl_s=0.01)
    liveness.end(conn, "finished")
    assert liveness.dead_runs(conn, ["finished"]) == []


def test_lease_holders_say_who_and_until_when(conn):
    seed_corpus(conn, {"s1": [f"http://h/{i}" for i in range(4)]})
    _lease(conn, "other", "s1", expires_in_s=30)
    liveness.beat(conn, "other", ["s1"], ttl_s=30)
    (holder,) = liveness.lease_holders(conn, ["s1"], exclude="me")
    assert (holder.owner, holder.urls) == ("other", 4)
    assert holder.heartbeat_at is not None and holder.expires_at > holder.heartbeat_at
    assert liveness.lease_holders(conn, ["s1"], exclude="other") == []
