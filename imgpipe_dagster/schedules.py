"""Schedules: the nightly run over a bounded set of pending shards.

``nightly_conservative`` fires at 02:00 in ``IMGPIPE_TIMEZONE`` (an IANA name, default UTC) and
requests ``IMGPIPE_NIGHTLY_SHARDS`` (default 20) claimable shards (pending, retryable past their
backoff, or with expired leases) that are not in flight and not parked, one ``analyze_conservative``
run each: the legacy's profile for unattended nights. It never requests one run per shard of the
whole corpus (``build_schedule_from_partitioned_job`` would, and refuses dynamic partitions
anyway); the runs queue in Dagster's run queue, whose limits apply. It skips while the throttle is
paused (GPU servers down, network or corpus broken). Each tick is stored in throttle_decisions
(source ``nightly``).

Default status: stopped, like the throttle (unattended GPU work is switched on on purpose);
``IMGPIPE_NIGHTLY_AUTOSTART=1`` makes it start running.
"""

from __future__ import annotations

import time

from dagster import DefaultScheduleStatus, ScheduleEvaluationContext, SkipReason, schedule

from imgpipe_dagster.environment import read_environment
from imgpipe_dagster.jobs import ANALYSIS_JOBS
from imgpipe_dagster.resources import PostgresResource
from imgpipe_dagster.sensors.throttle import (
    MAX_RETRIES_PER_CAUSE,
    RETRY_MEMORY_HOURS,
    analysis_runs_in_flight,
    shard_run_request,
    shards_of_run,
)
from imgpipe_dagster.throttle import queries
from imgpipe_dagster.throttle.decide import Backlog, Decision, ThrottleState, TickInputs, WindowStats

DEFAULT_NIGHTLY_SHARDS = 20
NIGHTLY_PROFILE = "conservative"
# A throttle pause older than this is not trusted any more (the throttle may have been stopped since).
PAUSE_TRUST_S = 3600.0


def nightly_shard_count() -> int:
    configured = read_environment().nightly_shards
    return max(1, DEFAULT_NIGHTLY_SHARDS if configured is None else configured)


def nightly_tick(context: ScheduleEvaluationContext, postgres: PostgresResource, shard_count: int):
    started = time.perf_counter()
    runs = analysis_runs_in_flight(context.instance)
    with postgres.connect() as conn:
        latest = queries.latest_decision(conn)
        if latest and latest["paused"]:
            age = time.time() - latest["decided_at"].timestamp()
            if age < PAUSE_TRUST_S:
                return SkipReason(f"the throttle is paused: {latest['reason']}")
        in_flight = [shard for run in runs for shard in shards_of_run(conn, run.tags)]
        parked = queries.parked_shards(conn, MAX_RETRIES_PER_CAUSE, RETRY_MEMORY_HOURS)
        backlog: Backlog = queries.read_backlog(conn, in_flight, shard_count, parked)
        if not backlog.candidates:
            return SkipReason(
                f"no claimable shard ({backlog.shards_with_work} with work, all in flight or parked)"
            )
        decision_id = queries.next_decision_id(conn)
        decision = Decision(
            action="submit", profile=NIGHTLY_PROFILE, previous_profile=NIGHTLY_PROFILE, paused=False,
            reason=f"nightly: {len(backlog.candidates)} of at most {shard_count} shards with {NIGHTLY_PROFILE}",
            submit=backlog.candidates, limit=shard_count, free_slots=shard_count, verdict="nightly",
            state=ThrottleState(profile=NIGHTLY_PROFILE, last_decision_id=decision_id),
        )  # fmt: skip
        inputs = TickInputs(
            now=time.time(), window=WindowStats(window_s=0.0), gpus=(), backlog=backlog,
            runs_in_flight=len(runs), shards_in_flight=tuple(in_flight),
        )  # fmt: skip
        tick_ms = (time.perf_counter() - started) * 1000.0
        queries.store_decision(conn, decision_id, "nightly", decision, inputs.as_dict(), tick_ms)
    context.log.info(f"nightly #{decision_id}: {decision.reason}: {', '.join(decision.submit)}")
    return [
        shard_run_request(shard, NIGHTLY_PROFILE, decision_id, source="nightly") for shard in decision.submit
    ]


def build_nightly_schedule(
    shard_count: int | None = None, default_status: DefaultScheduleStatus | None = None
):
    if default_status is None:
        autostart = read_environment().nightly_autostart
        default_status = DefaultScheduleStatus.RUNNING if autostart else DefaultScheduleStatus.STOPPED

    @schedule(
        name="nightly_conservative",
        cron_schedule="0 2 * * *",
        execution_timezone=read_environment().timezone or "UTC",
        job=ANALYSIS_JOBS[NIGHTLY_PROFILE],
        default_status=default_status,
        description="02:00: a bounded set of pending/retryable shards with the conservative profile.",
    )
    def nightly_conservative(context: ScheduleEvaluationContext, postgres: PostgresResource):
        return nightly_tick(context, postgres, shard_count or nightly_shard_count())

    return nightly_conservative


nightly_schedule = build_nightly_schedule()
SCHEDULES = [nightly_schedule]
