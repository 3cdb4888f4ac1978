"""The run-failure sensor (leases back, bounded retries per cause) and the nightly schedule (a bounded
set with the conservative profile), against a real Postgres and Dagster instance."""

from __future__ import annotations

from dagster import (
    AssetKey,
    DagsterRunStatus,
    DefaultScheduleStatus,
    Definitions,
    build_run_status_sensor_context,
    build_schedule_context,
)
from dagster._core.events import JobFailureData
from dagster._core.test_utils import create_run_for_test
from dagster._utils.error import SerializableErrorInfo

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.jobs import ANALYSIS_JOBS
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.schedules import (
    DEFAULT_NIGHTLY_SHARDS,
    build_nightly_schedule,
    nightly_schedule,
    nightly_shard_count,
)
from imgpipe_dagster.sensors.run_failure import shard_run_failures
from imgpipe_dagster.store.work import claim, shard_state_counts
from imgpipe_dagster.throttle.decide import Decision, ThrottleState
from imgpipe_dagster.throttle.queries import next_decision_id, store_decision
from imgpipe_dagster_tests.sensors.support import add_run, seed_shards


def fail_run(
    instance, run, message="GPU server http://127.0.0.1:8000 answered 500 after 3 retries (run 1234)"
):
    error = SerializableErrorInfo(message=message, stack=[], cls_name="Failure")
    event = instance.report_run_failed(run, job_failure_data=JobFailureData(error=error, failure_reason=None))
    return event


def evaluate(instance, database_url, run, event):
    context = build_run_status_sensor_context(
        sensor_name="shard_run_failures", dagster_event=event, dagster_instance=instance, dagster_run=run,
        resources={"postgres": PostgresResource(database_url=database_url)},
    ).for_run_failure()  # fmt: skip
    return shard_run_failures(context)


def store_throttle_state(conn, paused: bool, profile="medium", reason="every GPU server is down"):
    decision_id = next_decision_id(conn)
    decision = Decision(action="pause" if paused else "hold", profile=profile, previous_profile=profile,
                        paused=paused, reason=reason, submit=(), limit=10, free_slots=0, verdict="insufficient",
                        state=ThrottleState(profile=profile, paused=paused))  # fmt: skip
    store_decision(conn, decision_id, "throttle", decision, {}, 1.0)


def test_failed_run_releases_its_leases_and_is_retried_a_bounded_number_of_times(
    dagster_instance, conn, database_url
):
    shard = seed_shards(conn, dagster_instance, 2, urls_per_shard=10)[0]
    store_throttle_state(conn, paused=False, profile="medium")
    actions = []
    for attempt in range(1, 5):
        run = add_run(dagster_instance, "analyze_aggressive", shard, profile="aggressive")
        assert len(claim(conn, run.run_id, [shard], 4, 600)) == 4
        result = evaluate(dagster_instance, database_url, run, fail_run(dagster_instance, run))
        counts = shard_state_counts(conn, [shard])
        assert counts["leased"] == 0 and counts["pending"] == 10, (
            attempt
        )  # nothing waits for a lease to expire
        row = conn.execute("SELECT action, urls_released, failures_same_cause, cause FROM run_failures"
                           " WHERE run_id = %s", (run.run_id,)).fetchone()  # fmt: skip
        assert row[1] == 4 and row[2] == attempt
        assert row[3] == "Failure: GPU server http://#.#.#.#:# answered # after # retries (run #)"
        actions.append(row[0])
        if row[0] == "retried":
            # the run again as it was: its job (profile), not the throttle's profile
            assert result.partition_key == shard and result.job_name == "analyze_aggressive"
            assert result.run_key == f"retry:{run.run_id}"
            assert result.tags["imgpipe/retry_of"] == run.run_id
            assert int(result.tags["dagster/priority"]) > 0
        else:
            assert "budget_spent" in result.skip_message
    assert actions == ["retried", "retried", "budget_spent", "budget_spent"]


def test_another_cause_has_its_own_budget_and_a_run_is_handled_once(dagster_instance, conn, database_url):
    shard = seed_shards(conn, dagster_instance, 1)[0]
    for _ in range(3):
        run = add_run(dagster_instance, "analyze_medium", shard)
        evaluate(dagster_instance, database_url, run, fail_run(dagster_instance, run))
    run = add_run(dagster_instance, "analyze_medium", shard)
    event = fail_run(dagster_instance, run, message="database connection lost")
    assert evaluate(dagster_instance, database_url, run, event).partition_key == shard
    again = evaluate(dagster_instance, database_url, run, event)
    assert "already handled" in again.skip_message


def test_no_retry_while_the_throttle_is_paused(dagster_instance, conn, database_url):
    shard = seed_shards(conn, dagster_instance, 1)[0]
    store_throttle_state(conn, paused=True)
    run = add_run(dagster_instance, "analyze_medium", shard)
    result = evaluate(dagster_instance, database_url, run, fail_run(dagster_instance, run))
    assert "left_to_throttle" in result.skip_message and "GPU server is down" in result.skip_message


def test_a_retry_carries_the_runs_own_config_and_tags(dagster_instance, conn, database_url):
    shard = seed_shards(conn, dagster_instance, 1)[0]
    store_throttle_state(conn, paused=False, profile="conservative")
    config = {"ops": {"image_analysis": {"config": {"profile": "aggressive", "worker": {"chunk_size": 7}}}}}
    run = create_run_for_test(
        dagster_instance, job_name="analyze_medium", status=DagsterRunStatus.STARTED, run_config=config,
        tags={"dagster/partition": shard, "imgpipe/profile": "aggressive", "imgpipe/kind": "shard_run",
              "imgpipe/source": "manual", "team": "vision"},
    )  # fmt: skip

    request = evaluate(dagster_instance, database_url, run, fail_run(dagster_instance, run))

    assert request.job_name == "analyze_medium" and request.run_config == config
    assert request.partition_key == shard
    carried = {k: request.tags[k] for k in ("imgpipe/profile", "imgpipe/kind", "imgpipe/source", "team")}
    assert carried == {"imgpipe/profile": "aggressive", "imgpipe/kind": "shard_run", "imgpipe/source": "manual",
                       "team": "vision"}  # fmt: skip
    assert request.tags["imgpipe/retry_of"] == run.run_id


def test_a_backfill_run_is_retried_as_its_profiles_job_and_other_runs_are_skipped(
    dagster_instance, conn, database_url
):
    shards = seed_shards(conn, dagster_instance, 2)
    config = {"ops": {"image_analysis": {"config": {"profile": "aggressive"}}}}
    backfill_run = create_run_for_test(
        dagster_instance, job_name="__ASSET_JOB", status=DagsterRunStatus.STARTED, run_config=config,
        asset_selection=frozenset({AssetKey("image_analysis")}),
        tags={"dagster/asset_partition_range_start": shards[0], "dagster/asset_partition_range_end": shards[1],
              "dagster/backfill": "abcdefgh", "imgpipe/profile": "aggressive"},
    )  # fmt: skip
    request = evaluate(dagster_instance, database_url, backfill_run, fail_run(dagster_instance, backfill_run))
    assert request.job_name == "analyze_aggressive" and request.run_config == config
    assert (request.tags["dagster/asset_partition_range_start"], request.tags["dagster/asset_partition_range_end"]) \
        == (shards[0], shards[1])  # fmt: skip
    assert "dagster/backfill" not in request.tags  # the retry is not one of the backfill's runs

    report_run = create_run_for_test(dagster_instance, job_name="refresh_progress_report",
                                     status=DagsterRunStatus.STARTED)  # fmt: skip
    skipped = evaluate(dagster_instance, database_url, report_run, fail_run(dagster_instance, report_run))
    assert "not a shard run" in skipped.skip_message


def test_a_config_error_is_never_retried_and_the_tick_says_why(dagster_instance, conn, database_url):
    """A real run of analyze_medium whose worker override breaks the profile's rules (chunk_size 0)."""
    shard = seed_shards(conn, dagster_instance, 1, urls_per_shard=3)[0]
    job = Definitions(
        assets=[image_analysis], jobs=[ANALYSIS_JOBS["medium"]],
        resources={"postgres": PostgresResource(database_url=database_url), "gpu_model": GpuModelResource(),
                   "fetcher": FetcherResource()},
    ).resolve_job_def("analyze_medium")  # fmt: skip
    bad = {"ops": {"image_analysis": {"config": {"profile": "medium", "worker": {"chunk_size": 0}}}}}
    result = job.execute_in_process(run_config=bad, partition_key=shard, instance=dagster_instance,
                                    raise_on_error=False)  # fmt: skip
    assert not result.success
    run = dagster_instance.get_run_by_id(result.run_id)
    (failure,) = [e.dagster_event for e in dagster_instance.all_logs(run.run_id)
                  if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE"]  # fmt: skip

    skipped = evaluate(dagster_instance, database_url, run, failure)

    assert "not_retried" in skipped.skip_message and "config error" in skipped.skip_message
    assert "chunk_size" in skipped.skip_message
    row = conn.execute("SELECT action FROM run_failures WHERE run_id = %s", (run.run_id,)).fetchone()
    assert row == ("not_retried",)
    assert shard_state_counts(conn, [shard])["pending"] == 3  # nothing lost, nothing claimed


def nightly(instance, database_url, schedule=nightly_schedule):
    # closed after the evaluation: an open context with resources leaves Dagster's defs-state storage
    # pointing at its instance, and a later test that loads definitions would reach the dead instance
    with build_schedule_context(instance=instance,
                                resources={"postgres": PostgresResource(database_url=database_url)}) as context:  # fmt: skip
        return schedule(context)


def test_nightly_requests_a_bounded_set_with_the_conservative_profile(dagster_instance, conn, database_url):
    shards = seed_shards(conn, dagster_instance, 50)
    conn.execute("UPDATE corpus_urls SET state = 'done' WHERE shard_id = ANY(%s)", (shards[:5],))
    conn.execute("UPDATE corpus_urls SET state = 'failed_retryable', next_attempt_at = now() - interval '1 minute'"
                 " WHERE shard_id = %s", (shards[5],))  # fmt: skip
    conn.commit()
    add_run(dagster_instance, "analyze_medium", shards[6])

    requests = nightly(dagster_instance, database_url)

    assert len(requests) == 20  # the default bound, out of 44 claimable shards
    assert [r.partition_key for r in requests] == [shards[5], *shards[7:26]]
    assert {r.job_name for r in requests} == {"analyze_conservative"}
    assert all(r.tags["imgpipe/source"] == "nightly" for r in requests)
    assert all(int(r.tags["dagster/priority"]) < 0 for r in requests)  # behind retries and manual runs
    assert len({r.run_key for r in requests}) == 20
    stored = conn.execute("SELECT source, profile, cardinality(submitted) FROM throttle_decisions").fetchall()
    assert stored == [("nightly", "conservative", 20)]


def test_nightly_bound_is_configurable_and_it_skips_while_paused(dagster_instance, conn, database_url):
    seed_shards(conn, dagster_instance, 10)
    assert len(nightly(dagster_instance, database_url, build_nightly_schedule(shard_count=3))) == 3
    store_throttle_state(conn, paused=True)
    skipped = nightly(dagster_instance, database_url)
    assert "throttle is paused" in skipped.skip_message


def test_nightly_is_at_two_in_the_configured_time_zone(monkeypatch):
    monkeypatch.setenv("IMGPIPE_TIMEZONE", "Europe/Berlin")
    schedule = build_nightly_schedule()
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.execution_timezone == "Europe/Berlin"
    assert nightly_schedule.execution_timezone == "UTC"
    assert schedule.job_name == "analyze_conservative"


def test_nightly_autostart_and_bound_are_read_when_asked(monkeypatch):
    monkeypatch.delenv("IMGPIPE_NIGHTLY_AUTOSTART", raising=False)
    monkeypatch.delenv("IMGPIPE_NIGHTLY_SHARDS", raising=False)
    assert build_nightly_schedule().default_status == DefaultScheduleStatus.STOPPED
    assert nightly_shard_count() == DEFAULT_NIGHTLY_SHARDS
    monkeypatch.setenv("IMGPIPE_NIGHTLY_AUTOSTART", "yes")
    monkeypatch.setenv("IMGPIPE_NIGHTLY_SHARDS", "7")
    assert build_nightly_schedule().default_status == DefaultScheduleStatus.RUNNING
    assert nightly_shard_count() == 7
    monkeypatch.setenv("IMGPIPE_NIGHTLY_SHARDS", "0")
    assert nightly_shard_count() == 1  # a bound of none still lets one shard through
