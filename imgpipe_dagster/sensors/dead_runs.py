"""The dead-run sensor: a run Dagster still shows in progress whose process is gone is marked failed.

Dagster's run monitoring cannot tell this for every launcher (the default launcher and
``dagster job execute`` have no worker health check; Celery's does not notice a killed worker), so
liveness comes from our own database: store/liveness.py finds the STARTED runs whose heartbeat (or,
for a run without one, whose URL leases) stopped being renewed. For each such run this sensor

1. gives its leased URLs back to the pool (pending, no retry spent) and drops its heartbeat;
2. reports the run failed through the instance (``report_run_failed``), with the evidence in the
   message; the failure event then reaches the run-failure sensor, which records it and retries
   the run's shards like any other failure.

A dead run is failed within its lease time (the heartbeat's time to live) + ``DEAD_RUN_GRACE_S`` +
one sensor interval (``DEAD_RUN_INTERVAL_S``): about 3 min with the medium profile's 120 s leases.
Default status: running (it only repairs what is broken).
"""

from __future__ import annotations

from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)
from dagster._core.events import JobFailureData, RunFailureReason
from dagster._utils.error import SerializableErrorInfo

from imgpipe_dagster.resources import PostgresResource
from imgpipe_dagster.store import liveness

# The failure message's first line: the cause shard_run_failures counts retries by (one text for
# every dead run, whatever its host or evidence; the details follow on the next line).
DEAD_RUN_CAUSE = "imgpipe dead-run detector: the run's process stopped renewing its heartbeat and leases"
DEAD_RUN_INTERVAL_S = 30
# Slack past an expiry before a run counts as dead: a database restart stalls every heartbeat at once.
DEAD_RUN_GRACE_S = 30.0


def runs_in_progress(instance: DagsterInstance) -> dict[str, object]:
    return {run.run_id: run for run in instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))}


def fail_dead_runs(instance: DagsterInstance, postgres: PostgresResource, grace_s: float) -> list[str]:
    """One pass: every dead run released and reported failed. Returns one line per run handled."""
    runs = runs_in_progress(instance)
    if not runs:
        return []
    handled = []
    with postgres.connect() as conn:
        for dead in liveness.dead_runs(conn, list(runs), grace_s):
            # The status may have changed since the listing (the run ended after all): leave it then.
            run = instance.get_run_by_id(dead.run_id)
            if run is None or run.status != DagsterRunStatus.STARTED:
                continue
            released = liveness.reclaim(conn, dead.run_id)
            message = f"{DEAD_RUN_CAUSE}\n{dead.describe()}; {released} URLs returned to the pool"
            # an error with a class of its own: shard_run_failures records "DeadRun: <first line>" as the cause
            error = SerializableErrorInfo(message=message, stack=[], cls_name="DeadRun")
            failure = JobFailureData(error=error, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION)
            instance.report_run_failed(run, message=message, job_failure_data=failure)
            handled.append(message)
    return handled


def build_dead_run_sensor(grace_s: float = DEAD_RUN_GRACE_S, interval_s: int = DEAD_RUN_INTERVAL_S, name: str = "dead_runs"):
    """The sensor; tests pass a short grace."""

    @sensor(
        name=name,
        minimum_interval_seconds=interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description="Marks failed the STARTED runs whose heartbeat or URL leases stopped being renewed "
        "(their process died), and returns their URLs to the pool; the run-failure sensor retries them.",
    )
    def dead_runs(context: SensorEvaluationContext, postgres: PostgresResource):
        handled = fail_dead_runs(context.instance, postgres, grace_s)
        for line in handled:
            context.log.warning(line)
        return SkipReason("; ".join(handled) if handled else "no dead run")

    return dead_runs


dead_runs_sensor = build_dead_run_sensor()
