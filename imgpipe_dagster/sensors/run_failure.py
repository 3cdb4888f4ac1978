"""The run-failure sensor: a failed shard run gives its URLs back and is retried a bounded number of times.

For every failed ``analyze_<profile>`` run:

1. its leased URLs go back to pending without spending their retry budget
   (``store.work.release_leases(conn, run_id)``: the run id is the lease owner), so no URL waits
   for its lease to expire;
2. the failure is recorded in ``run_failures`` (once per run, whatever the daemon replays) with its
   *cause*: the error class and first line of the step's (else the run's) error, numbers masked;
3. its shards are requested again with the throttle's current profile, unless
   - Dagster's own run retry takes it (``dagster/will_retry``: a crashed worker), or
   - the throttle is paused (the GPUs are down or the network is broken: a retry would fail the
     same way; the shards stay in the backlog and the throttle takes them on resume), or
   - one of its shards already failed ``MAX_RETRIES_PER_CAUSE`` (2) times with the same cause in
     the last 24 h: its budget is spent, the shard is *parked* (the throttle skips it too) and
     the reason is in run_failures for an operator.

A retry takes the slot the failed run freed, so it never pushes the runs in flight over the
profile's limit. Default status: running (it only repairs what failed).
"""

from __future__ import annotations

from dagster import DefaultSensorStatus, RunFailureSensorContext, RunRequest, SkipReason, run_failure_sensor
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    WILL_RETRY_TAG,
)

from imgpipe_dagster.jobs import ANALYSIS_JOBS, PROFILE_TAG, analysis_job_name
from imgpipe_dagster.resources import PostgresResource
from imgpipe_dagster.sensors.throttle import (
    KIND_TAG,
    MAX_RETRIES_PER_CAUSE,
    RETRY_MEMORY_HOURS,
    SHARD_RUN,
    SOURCE_TAG,
    shards_of_run,
)
from imgpipe_dagster.store.work import release_leases
from imgpipe_dagster.throttle import queries

RETRY_OF_TAG = "imgpipe/retry_of"


def failure_error(context: RunFailureSensorContext) -> tuple[str | None, str | None]:
    """(error class, message) of what failed: the first failed step's error, else the run's."""
    for event in context.get_step_failure_events():
        error = getattr(event.event_specific_data, "error", None)
        if error is not None:
            return error.cls_name, error.message
    data = context.failure_event.event_specific_data
    error = getattr(data, "error", None)
    if error is not None:
        return error.cls_name, error.message
    return None, context.failure_event.message


def retry_request(run, shards: list[str], profile: str, failures: int) -> RunRequest:
    tags = {
        KIND_TAG: SHARD_RUN,
        SOURCE_TAG: "run_failure",
        RETRY_OF_TAG: run.run_id,
        "imgpipe/retry": str(failures),
    }
    partition_key = None
    if PARTITION_NAME_TAG in run.tags:
        partition_key = run.tags[PARTITION_NAME_TAG]
    else:
        tags[ASSET_PARTITION_RANGE_START_TAG] = run.tags.get(ASSET_PARTITION_RANGE_START_TAG, shards[0])
        tags[ASSET_PARTITION_RANGE_END_TAG] = run.tags.get(ASSET_PARTITION_RANGE_END_TAG, shards[-1])
    return RunRequest(
        run_key=f"retry:{run.run_id}",
        job_name=analysis_job_name(profile),
        partition_key=partition_key,
        tags=tags,
    )


def handle_failure(context: RunFailureSensorContext, postgres: PostgresResource):
    run = context.dagster_run
    with postgres.connect() as conn:
        shards = shards_of_run(conn, run.tags)
        released = release_leases(conn, run.run_id)
        error_class, message = failure_error(context)
        cause = queries.failure_cause(error_class, message)
        latest = queries.latest_decision(conn)
        profile = (latest or {}).get("profile") or run.tags.get(PROFILE_TAG) or "conservative"
        failures = queries.failures_same_cause(conn, shards, cause, RETRY_MEMORY_HOURS) + 1 if shards else 1
        request = None
        if not shards:
            action, why = "no_shards", "the run names no shard"
        elif run.tags.get(WILL_RETRY_TAG) == "true":
            action, why = "dagster_retries", "Dagster's run retry re-launches it"
        elif latest is not None and latest.get("paused"):
            action, why = "left_to_throttle", f"the throttle is paused ({latest.get('reason')})"
        elif failures > MAX_RETRIES_PER_CAUSE:
            action, why = (
                "budget_spent",
                f"failure {failures} with this cause (at most {MAX_RETRIES_PER_CAUSE} retries)",
            )
        else:
            request = retry_request(run, shards, profile, failures)
            action, why = "retried", f"retry {failures} of {MAX_RETRIES_PER_CAUSE} with {profile}"
        recorded = queries.record_failure(
            conn, run.run_id, run.job_name, shards, cause, message, released, failures, action,
            request.run_key if request else None,
        )  # fmt: skip
    summary = (
        f"run {run.run_id} ({run.job_name}, shards {shards}) failed: {cause}; {released} leased URLs released"
    )
    if not recorded:
        return SkipReason(f"{summary}; already handled")
    context.log.info(f"{summary}; {action}: {why}")
    return request or SkipReason(f"{summary}; {action}: {why}")


@run_failure_sensor(
    name="shard_run_failures",
    monitored_jobs=list(ANALYSIS_JOBS.values()),
    request_jobs=list(ANALYSIS_JOBS.values()),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Releases a failed shard run's leased URLs, records the failure (run_failures) and retries "
    f"its shards at most {MAX_RETRIES_PER_CAUSE} times per cause.",
)
def shard_run_failures(context: RunFailureSensorContext, postgres: PostgresResource):
    return handle_failure(context, postgres)
