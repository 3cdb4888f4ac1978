"""A run that waits for another run's leases says in its progress lines whose and until when, then
takes the URLs once those leases expire (a dead run's). Real host, tiny-model GPU server, Postgres."""

from __future__ import annotations

from datetime import UTC

from imgpipe_dagster.engine.runner import ShardRunner
from imgpipe_dagster.store import liveness
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster_tests.engine.conftest import LoggedHost
from imgpipe_dagster_tests.engine.test_retries import SHARD, small_run
from imgpipe_dagster_tests.support import seed_corpus


def test_a_rerun_says_whose_leases_it_waits_for_and_until_when(conn, database_url, gpu_endpoint, imgpipe_home):
    with LoggedHost() as host:
        urls = [host.url(f"/ok/{n}.jpg") for n in range(6)]
        seed_corpus(conn, {SHARD: urls})
        # a dead run's leases on all of them, expiring in 10 s, and its heartbeat (already stale)
        (expires_at,) = conn.execute(
            "UPDATE corpus_urls SET state = 'leased', lease_owner = 'dead-run',"
            " lease_expires_at = date_trunc('second', now()) + interval '10 seconds'"
            " RETURNING lease_expires_at").fetchall()[0]  # fmt: skip
        conn.commit()
        liveness.beat(conn, "dead-run", [SHARD], ttl_s=1)

        lines: list[str] = []
        settings = small_run(retry_delay=0.01)
        summary = ShardRunner(database_url, "rerun", [SHARD], settings, [gpu_endpoint],
                              progress=lambda line, _summary: lines.append(line)).run()  # fmt: skip

    waiting = [line for line in lines if "waiting for" in line]
    assert waiting, lines
    until = expires_at.astimezone(UTC).strftime("%H:%M:%S")
    assert "waiting for 6 URLs leased by run dead-run (last heartbeat " in waiting[0]
    assert f"until {until} UTC" in waiting[0]
    assert summary.final_count("done") == 6
    assert verify(conn, [SHARD]).complete
