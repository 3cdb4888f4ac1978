"""The throttle sensor: the feeder that keeps the right number of shard runs going.

Every ``minimum_interval_seconds`` (30 s) one tick:

1. reads the runs in flight from the Dagster instance (QUEUED / NOT_STARTED / STARTING / STARTED /
   CANCELING runs of any ``analyze_<profile>`` job: its own, backfills' and manual runs alike, all
   carry the ``imgpipe/profile`` job tag) and the shards they hold (``dagster/partition`` or a
   backfill run's partition range);
2. reads from Postgres the recent window (rate, failure and timeout ratios, p95 download and
   inference latency), the backlog (claimable shards not in flight, shards with work, unfinished
   URLs up to a cap) and the shards whose retries are spent (run_failures);
3. probes each GPU server's /health in parallel with a 1 s timeout (external mode: the configured
   endpoints; managed mode: the servers the launcher recorded and whose process lives; a managed
   server not started yet is not "down": the next run starts it);
4. calls ``imgpipe_dagster.throttle.decide`` (pure; the rules and the hysteresis are documented
   there) and applies it: RunRequests for ``analyze_<profile in force>`` with
   ``partition_key=<shard>``, ``run_key=<shard>@<decision id>`` (unique per shard and attempt,
   even after a cursor reset) and the tags ``imgpipe/kind=shard_run``,
   ``imgpipe/source=throttle``, ``imgpipe/decision=<id>``;
5. sets the Dagster concurrency pool ``imgpipe_gpu`` to the profile's ``max_concurrent_workers``
   (``imgpipe_dagster.pool``), so runs launched elsewhere (backfills, the UI) keep to the same limit;
6. stores the decision with all its inputs in ``throttle_decisions`` and logs it; the state
   (profile, healthy_since, pause, last decision) is the sensor's cursor (JSON), so a restart or a
   new daemon resumes where it was. A missing cursor starts at ``start_profile`` (medium).

A tick on a 20M-URL corpus with 2,000 shards reads bounded index ranges only
(bench/throttle_tick.py), far below the 60 s sensor timeout.

Default status: **stopped**. Turning the feeder on starts GPU servers and downloads from third-party
hosts at scale, which an operator should do on purpose (UI: Automation → throttle → on, or
``dagster sensor start throttle``); a stopped throttle loses nothing, the backlog waits in
Postgres. ``IMGPIPE_THROTTLE_AUTOSTART=1`` in the code location's environment makes it start
running (unattended installs, the daemon test). Knobs: ``IMGPIPE_THROTTLE_<FIELD>`` for every
field of ``ThrottleSettings``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import psycopg
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from imgpipe_dagster.assets.config import GPU_POOL
from imgpipe_dagster.deploy.celery_nodes import queues_for
from imgpipe_dagster.environment import read_environment
from imgpipe_dagster.gpu_server.discovery import discover_endpoints
from imgpipe_dagster.jobs import ANALYSIS_JOBS, NIGHTLY_PRIORITY, PRIORITY_TAG, PROFILE_TAG, analysis_job_name
from imgpipe_dagster.pool import sync_pool_limit
from imgpipe_dagster.profiles import PROFILE_NAMES
from imgpipe_dagster.resources import GpuModelResource, PostgresResource
from imgpipe_dagster.throttle import queries
from imgpipe_dagster.throttle.decide import (
    Decision,
    GpuHealth,
    ThrottleSettings,
    ThrottleState,
    TickInputs,
    decide,
)
from imgpipe_dagster.throttle.health import probe_all
from imgpipe_dagster.throttle.placement import QUEUE_TAG

KIND_TAG = "imgpipe/kind"
SHARD_RUN = "shard_run"
SOURCE_TAG = "imgpipe/source"
DECISION_TAG = "imgpipe/decision"
MINIMUM_INTERVAL_S = 30
# Runs that hold (or are about to hold) a slot.
IN_FLIGHT_STATUSES = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]
# The run-failure sensor's retry budget: a shard failing more often than this for one cause
# within RETRY_MEMORY_HOURS is parked (neither sensor requests it again).
MAX_RETRIES_PER_CAUSE = 2
RETRY_MEMORY_HOURS = 24.0
# Every this many decisions, plain ticks (hold / idle / submit) older than KEEP_TICKS_DAYS are pruned.
PRUNE_EVERY = 500
KEEP_TICKS_DAYS = 30


def analysis_runs_in_flight(instance: DagsterInstance) -> list:
    return list(
        instance.get_runs(
            filters=RunsFilter(statuses=IN_FLIGHT_STATUSES, tags={PROFILE_TAG: list(PROFILE_NAMES)})
        )
    )


def shards_of_run(conn: psycopg.Connection, tags: dict) -> list[str]:
    """The shards a run works on: its partition, or the range a multi-partition backfill run covers."""
    if tags.get(PARTITION_NAME_TAG):
        return [tags[PARTITION_NAME_TAG]]
    first, last = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if first and last:
        return queries.shards_between(conn, first, last) or [first, last]
    return []


def gpu_health(gpu_model: GpuModelResource, timeout_s: float, registry_url: str | None = None) -> tuple[GpuHealth, ...]:
    """/health of the servers the runs would use. External: every configured endpoint. Managed: the
    recorded servers whose process lives (one that is not running is cold, not down). Both: the live
    servers of the registry in ``registry_url``."""
    urls = discover_endpoints(gpu_model.endpoints if gpu_model.mode == "external" else (),
                              managed=gpu_model.mode == "managed", registry_url=registry_url)  # fmt: skip
    openai = gpu_model.api == "openai"  # servers without /health (vLLM…) are up when they list models
    return probe_all(urls, timeout_s, token=gpu_model.bearer_token(),
                     openai_key=gpu_model.api_key or gpu_model.bearer_token(), openai=openai)  # fmt: skip


def shard_run_request(
    shard: str, profile: str, decision_id: int, source: str = "throttle", queue: str | None = None
) -> RunRequest:
    tags = {KIND_TAG: SHARD_RUN, SOURCE_TAG: source, DECISION_TAG: str(decision_id)}
    if source == "nightly":
        tags[PRIORITY_TAG] = str(NIGHTLY_PRIORITY)  # retries and manual runs go first
    if queue:
        tags[QUEUE_TAG] = queue  # the Celery node that runs it (docs/DEPLOY.md)
    return RunRequest(
        run_key=f"{shard}@{decision_id}", job_name=analysis_job_name(profile), partition_key=shard, tags=tags
    )


def throttle_tick(
    context: SensorEvaluationContext,
    postgres: PostgresResource,
    gpu_model: GpuModelResource,
    settings: ThrottleSettings,
    clock: Callable[[], float] = time.time,
) -> SensorResult:
    started = time.perf_counter()
    state = ThrottleState.from_cursor(context.cursor, settings)
    runs = analysis_runs_in_flight(context.instance)
    gpus = gpu_health(gpu_model, settings.health_timeout_s, postgres.url())
    with postgres.connect() as conn:
        decision_id = queries.next_decision_id(conn)
        in_flight: list[str] = []
        for run in runs:
            in_flight.extend(shards_of_run(conn, run.tags))
        window = queries.read_window(conn, settings.window_s, settings.window_max_rows)
        parked = queries.parked_shards(conn, MAX_RETRIES_PER_CAUSE, RETRY_MEMORY_HOURS)
        backlog = queries.read_backlog(conn, in_flight, settings.max_submit_per_tick, parked)
        inputs = TickInputs(
            now=clock(), window=window, gpus=gpus, backlog=backlog, runs_in_flight=len(runs),
            shards_in_flight=tuple(dict.fromkeys(in_flight)),
        )  # fmt: skip
        decision = decide(inputs, state, settings)
        decision.state.last_decision_id = decision_id
        tick_ms = (time.perf_counter() - started) * 1000.0
        queries.store_decision(conn, decision_id, "throttle", decision, inputs.as_dict(), tick_ms)
        if decision_id % PRUNE_EVERY == 0:
            queries.prune_decisions(conn, KEEP_TICKS_DAYS)
    context.log.info(describe(decision_id, decision, inputs, tick_ms))
    if sync_pool_limit(context.instance, decision.limit):
        context.log.info(f"pool {GPU_POOL}: {decision.limit} slots ({decision.profile})")
    # On Celery nodes a shard goes to a node with a free slot; the others wait for a later tick.
    queues = queues_for(context.instance, runs, decision.submit, turn=decision_id)
    submit = decision.submit if queues is None else [shard for shard in decision.submit if shard in queues]
    if len(submit) < len(decision.submit):
        context.log.info(f"{len(decision.submit) - len(submit)} shard(s) wait for a free node slot")
    requests = [
        shard_run_request(shard, decision.profile, decision_id, queue=(queues or {}).get(shard))
        for shard in submit
    ]
    return SensorResult(
        run_requests=requests,
        cursor=decision.state.to_cursor(),
        skip_reason=None if requests else f"#{decision_id} {decision.action}: {decision.reason}",
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def describe(decision_id: int, decision: Decision, inputs: TickInputs, tick_ms: float) -> str:
    w = inputs.window
    gpus = (
        ", ".join(f"{g.url} {g.status if g.reachable else 'DOWN'} q{g.queue_size}" for g in inputs.gpus)
        or "none known"
    )
    return (
        f"throttle #{decision_id} {decision.action} [{decision.profile}{' PAUSED' if decision.paused else ''}]: "
        f"{decision.reason} | window {w.samples} URLs {w.rate_per_s:.1f}/s failures {w.failure_ratio:.2f} "
        f"timeouts {w.timeout_ratio:.2f} p95 download {_ms(w.p95_download_ms)} inference {_ms(w.p95_inference_ms)} | "
        f"GPUs {gpus} | backlog {inputs.backlog.shards_with_work} shards, "
        f"{inputs.backlog.urls_unfinished}{'+' if inputs.backlog.urls_capped else ''} URLs | "
        f"in flight {inputs.runs_in_flight}/{decision.limit} | {tick_ms:.0f} ms"
    )


def build_throttle_sensor(
    settings: ThrottleSettings | None = None,
    clock: Callable[[], float] = time.time,
    name: str = "throttle",
    default_status: DefaultSensorStatus | None = None,
    jobs: Sequence = (),
    interval_s: int = MINIMUM_INTERVAL_S,
):
    """The throttle sensor; tests pass their own settings and clock."""
    if default_status is None:
        autostart = read_environment().throttle_autostart
        default_status = DefaultSensorStatus.RUNNING if autostart else DefaultSensorStatus.STOPPED

    @sensor(
        name=name,
        jobs=list(jobs or ANALYSIS_JOBS.values()),
        minimum_interval_seconds=interval_s,
        default_status=default_status,
        description="Feeds shard runs into the free slots of the current profile; steps the profile down "
        "on failures/timeouts/latency, up after a healthy period; pauses when the GPUs are down or the "
        "network/corpus is broken. Decisions: table throttle_decisions.",
    )
    def throttle(context: SensorEvaluationContext, postgres: PostgresResource, gpu_model: GpuModelResource):
        return throttle_tick(context, postgres, gpu_model, settings or ThrottleSettings.from_env(), clock)

    return throttle


throttle_sensor = build_throttle_sensor()
