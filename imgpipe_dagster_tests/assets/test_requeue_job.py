"""Requeue end to end: URLs of a host that answers 503 fail with http_5xx in a real run; the host
recovers; the requeue_failed job (a dry run first) puts them back to pending; the next run analyses
them. Every URL stays in exactly one final state with its result row (`verify`)."""

from __future__ import annotations

import time

from dagster import materialize

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.partitions import URL_SHARDS
from imgpipe_dagster.requeue_job import requeue_failed
from imgpipe_dagster.resources import FetcherResource, PostgresResource
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster_tests.support import seed_corpus
from imgpipe_dagster_tests.web.image_server import ImageServer

# No retries: a 5xx is final at once, as it is for any URL after its retry budget.
SMALL_RUN = {"images_per_request": 4, "chunk_size": 5, "max_concurrent_batches": 2, "lease_seconds": 10,
             "retry_delay": 0.05, "retry_attempts": 0, "prefetch_concurrent_downloads": 8}  # fmt: skip


def analyse_until_final(instance, resources, conn, shard: str, deadline_s: float = 240.0) -> None:
    """Run image_analysis on the shard until every URL is final (a host's pause can leave some URLs
    deferred to a later run, as the throttle would start it)."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = materialize([image_analysis], instance=instance, partition_key=shard, resources=resources,
                             run_config={"ops": {"image_analysis": {"config": {"worker": SMALL_RUN}}}},
                             raise_on_error=False)  # fmt: skip
        report = verify(conn, [shard])
        conn.commit()
        if report.complete:
            return
        assert report.ok, report.lines()
        assert time.monotonic() < deadline, f"URLs still not final: {report.lines()} (last run ok: {result.success})"
        time.sleep(0.5)


def outcomes(conn) -> dict[str, str]:
    rows = conn.execute(
        "SELECT c.url, c.state::text || '/' || coalesce(r.error_class, r.status, '-') FROM corpus_urls c"
        " LEFT JOIN url_analysis_results r USING (url_hash)").fetchall()  # fmt: skip
    conn.commit()
    return dict(rows)


def requeue_run(instance, database_url, **config):
    return requeue_failed.execute_in_process(
        run_config={"ops": {"requeue_failed_urls": {"config": config}}}, instance=instance,
        resources={"postgres": PostgresResource(database_url=database_url)},
    )  # fmt: skip


def output_metadata(result) -> dict:
    (output,) = [event for event in result.all_events if event.is_successful_output]
    return {key: value.value for key, value in output.step_output_data.metadata.items()}


def test_http_5xx_urls_requeued_after_the_host_recovers_end_done(
    dagster_instance, database_url, conn, image_server, one_gpu_server
):
    with ImageServer(behaviour="unavailable", retry_after=0) as flaky:
        flaky_urls = [flaky.image_url("chelsea", "jpg", width=240, n=i) for i in range(4)]
        steady = [image_server.image_url("coffee", "jpg", width=240, n=1), image_server.url("/fault/status/404")]
        seed_corpus(conn, {"s000001": flaky_urls + steady})
        dagster_instance.add_dynamic_partitions(URL_SHARDS, ["s000001"])
        resources = {"postgres": PostgresResource(database_url=database_url), "gpu_model": one_gpu_server,
                     "fetcher": FetcherResource(allowed_networks=["127.0.0.0/8"])}  # fmt: skip

        analyse_until_final(dagster_instance, resources, conn, "s000001")
        first = outcomes(conn)
        assert {first[url] for url in flaky_urls} == {"failed_permanent/http_5xx"}
        assert first[steady[0]] == "done/ok" and first[steady[1]] == "failed_permanent/http_404"

        dry = requeue_run(dagster_instance, database_url, error_classes=["http_5xx"], dry_run=True)
        assert dry.success
        assert output_metadata(dry)["urls_by_class"] == {"http_5xx": 4}
        assert outcomes(conn) == first  # a dry run changes nothing

        flaky.behaviour = "ok"  # the host recovered
        host = f"127.0.0.1:{flaky.port}"
        requeued = requeue_run(dagster_instance, database_url, error_classes=["http_5xx"], host=host)
        assert requeued.success and output_metadata(requeued)["urls"] == 4
        assert output_metadata(requeued)["shards"] == ["s000001"]
        after = outcomes(conn)
        assert {after[url] for url in flaky_urls} == {"pending/-"}
        assert after[steady[1]] == "failed_permanent/http_404"  # another class stays as it was
        report = verify(conn, ["s000001"])
        assert report.ok and report.unfinished == {"pending": 4}, report.lines()
        again = requeue_run(dagster_instance, database_url, error_classes=["http_5xx"], host=host)
        assert again.success and output_metadata(again)["urls"] == 0  # nothing left to requeue: nothing registered twice
        assert conn.execute("SELECT count(*), count(DISTINCT url_hash) FROM requeued_failures").fetchone() == (4, 4)

        analyse_until_final(dagster_instance, resources, conn, "s000001")
        final = outcomes(conn)
    assert {final[url] for url in flaky_urls} == {"done/ok"}
    assert final[steady[0]] == "done/ok" and final[steady[1]] == "failed_permanent/http_404"
    assert verify(conn).complete
    (results, attempts) = conn.execute(
        "SELECT count(*), max(c.attempts) FROM url_analysis_results r JOIN corpus_urls c USING (url_hash)"
        " WHERE c.url = ANY(%s)", (flaky_urls,)).fetchone()  # fmt: skip
    assert results == 4 and attempts == 1  # attempts were reset by the requeue
