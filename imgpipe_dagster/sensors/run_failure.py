"""The run-failure sensor: a failed shard run gives its URLs back and is retried a bounded number of times.

For every failed shard run (an ``analyze_<profile>`` run, or an asset-page or backfill run of
image_analysis; other runs of the code location are skipped):

1. its leased URLs go back to pending without spending their retry budget
   (``store.work.release_leases(conn, run_id)``: the run id is the lease owner), so no URL waits
   for its lease to expire;
2. the failure is recorded in ``run_failures`` (once per run, whatever the daemon replays) with its
   *cause*: the error class and first line of the step's (else the run's) error, numbers masked;
3. its shards are requested again as the same job with exactly the run's config and tags (plus
   ``imgpipe/retry_of``, ``imgpipe/retry`` and a ``dagster/priority`` above the nightly set), unless
   - the cause is permanent (``imgpipe_dagster.failure_kinds``: the run's own config, a
     programming error): a retry would fail the same way, so the run is never retried, or
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

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    SkipReason,
    run_failure_sensor,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    WILL_RETRY_TAG,
)

from imgpipe_dagster.assets.config import DEFAULT_PROFILE
from imgpipe_dagster.failure_kinds import permanent_reason
from imgpipe_dagster.jobs import ANALYSIS_JOBS, PRIORITY_TAG, PROFILE_TAG, RETRY_PRIORITY, analysis_job_name
from imgpipe_dagster.resources import PostgresResource
from imgpipe_dagster.sensors.throttle import (
    MAX_RETRIES_PER_CAUSE,
    RETRY_MEMORY_HOURS,
    shards_of_run,
)
from imgpipe_dagster.store.work import release_leases
from imgpipe_dagster.throttle import queries

RETRY_OF_TAG = "imgpipe/retry_of"
ANALYSIS_JOBS_BY_NAME = {job.name for job in ANALYSIS_JOBS.values()}
ANALYSIS_KEY = AssetKey("image_analysis")


def failure_error(context: RunFailureSensorContext) -> tuple[str | None, str | None, dict]:
    """(error class, message, failure metadata) of what failed: the first failed step's error, else
    the run's."""
    for event in context.get_step_failure_events():
        data = event.event_specific_data
        error = getattr(data, "error", None)
        if error is not None:
            user_failure = getattr(data, "user_failure_data", None)
            metadata = {k: getattr(v, "value", v) for k, v in (user_failure.metadata if user_failure else {}).items()}
            return error.cls_name, error.message, metadata
    data = context.failure_event.event_specific_data
    error = getattr(data, "error", None)
    if error is not None:
        return error.cls_name, error.message, {}
    return None, context.failure_event.message, {}


def _carried_tags(tags: dict) -> dict:
    """The run's own tags, without those Dagster sets per run (ids, retry state, partition, backfill)."""
    return {k: v for k, v in tags.items() if not k.startswith(("dagster/", ".dagster/", "dagster-"))}


def is_shard_run(run) -> bool:
    return run.job_name in ANALYSIS_JOBS_BY_NAME or ANALYSIS_KEY in (run.asset_selection or ())


def retry_job_name(run) -> str:
    """The run's own job; an asset-page or backfill run (Dagster's jobless asset job, which a sensor
    cannot request) goes to the analyze_<profile> job of its profile, with the same run config."""
    if run.job_name in ANALYSIS_JOBS_BY_NAME:
        return run.job_name
    return analysis_job_name(run.tags.get(PROFILE_TAG) or DEFAULT_PROFILE)


def retry_request(run, shards: list[str], failures: int) -> RunRequest:
    """The failed run again: the same job, run config and tags, plus what marks it as a retry."""
    tags = _carried_tags(dict(run.tags)) | {
        RETRY_OF_TAG: run.run_id,
        "imgpipe/retry": str(failures),
        PRIORITY_TAG: str(RETRY_PRIORITY),
    }
    partition_key = None
    if PARTITION_NAME_TAG in run.tags:
        partition_key = run.tags[PARTITION_NAME_TAG]
    else:
        tags[ASSET_PARTITION_RANGE_START_TAG] = run.tags.get(ASSET_PARTITION_RANGE_START_TAG, shards[0])
        tags[ASSET_PARTITION_RANGE_END_TAG] = run.tags.get(ASSET_PARTITION_RANGE_END_TAG, shards[-1])
    return RunRequest(
        run_key=f"retry:{run.run_id}",
        job_name=retry_job_name(run),
        run_config=run.run_config,
        partition_key=partition_key,
        tags=tags,
    )


def handle_failure(context: RunFailureSensorContext, postgres: PostgresResource):
    run = context.dagster_run
    if not is_shard_run(run):
        return SkipReason(f"run {run.run_id} ({run.job_name}) is not a shard run")
    with postgres.connect() as conn:
        shards = shards_of_run(conn, run.tags)
        released = release_leases(conn, run.run_id)
        error_class, message, failure_metadata = failure_error(context)
        cause = queries.failure_cause(error_class, message)
        latest = queries.latest_decision(conn)
        permanent = permanent_reason(error_class, failure_metadata)
        failures = queries.failures_same_cause(conn, shards, cause, RETRY_MEMORY_HOURS) + 1 if shards else 1
        request = None
        if not shards:
            action, why = "no_shards", "the run names no shard"
        elif permanent:
            action, why = "not_retried", f"{permanent}: a retry would fail the same way"
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
            request = retry_request(run, shards, failures)
            action, why = (
                "retried",
                f"retry {failures} of {MAX_RETRIES_PER_CAUSE} as {run.job_name} with the run's own config and tags",
            )
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
    # every job of the code location: asset-page and backfill runs of image_analysis run as Dagster's
    # own asset job; handle_failure skips runs that analyse no shard
    request_jobs=list(ANALYSIS_JOBS.values()),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Releases a failed shard run's leased URLs, records the failure (run_failures) and retries "
    f"its shards (same job, config and tags) at most {MAX_RETRIES_PER_CAUSE} times per transient cause; "
    "a config error or other permanent cause is never retried.",
)
def shard_run_failures(context: RunFailureSensorContext, postgres: PostgresResource):
    return handle_failure(context, postgres)
