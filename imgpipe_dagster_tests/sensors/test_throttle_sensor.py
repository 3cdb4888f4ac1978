"""The throttle sensor against a real Postgres and a real Postgres-backed Dagster instance, each
branch seeded for itself; GPU servers are real HTTP /health endpoints on loopback (or a closed port)."""

from __future__ import annotations

import json

import pytest
from dagster import DagsterRunStatus, DefaultSensorStatus, build_sensor_context

from imgpipe_dagster.resources import GpuModelResource, PostgresResource
from imgpipe_dagster.sensors.throttle import build_throttle_sensor
from imgpipe_dagster.throttle import ThrottleSettings
from imgpipe_dagster.throttle.queries import recent_decisions
from imgpipe_dagster_tests.sensors.support import (
    HealthServer,
    add_run,
    clear_results,
    seed_results,
    seed_shards,
)
from imgpipe_dagster_tests.support import refused_port

SETTINGS = ThrottleSettings(healthy_period_s=600, min_dwell_s=120, pause_min_s=300, max_submit_per_tick=8)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def gpu():
    with HealthServer() as server:
        yield server


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def tick(dagster_instance, database_url, gpu, clock):
    """tick(cursor, endpoints=...) -> SensorResult, evaluated like the daemon does (same sensor object
    unless ``fresh``; a new context each time)."""
    sensor = build_throttle_sensor(SETTINGS, clock=clock)

    def run(cursor=None, endpoints=None, fresh=False):
        target = build_throttle_sensor(SETTINGS, clock=clock) if fresh else sensor
        resources = {
            "postgres": PostgresResource(database_url=database_url),
            "gpu_model": GpuModelResource(mode="external", endpoints=endpoints or [gpu.url]),
        }
        # closed after the tick: an open context with resources leaves Dagster's defs-state storage
        # pointing at its instance for later tests
        with build_sensor_context(instance=dagster_instance, cursor=cursor, resources=resources) as context:
            return target(context)

    return run


def profile_of(result) -> str:
    return json.loads(result.cursor)["profile"]


def test_submits_into_free_slots_skipping_shards_in_flight(tick, conn, dagster_instance):
    shards = seed_shards(conn, dagster_instance, 12)
    for shard in shards[:4]:
        add_run(dagster_instance, "analyze_medium", shard)
    add_run(dagster_instance, "analyze_medium", shards[4], status=DagsterRunStatus.SUCCESS)  # not in flight

    result = tick()

    # medium: 10 workers, 4 in flight -> 6 free slots
    assert [r.partition_key for r in result.run_requests] == shards[4:10]
    request = result.run_requests[0]
    assert request.job_name == "analyze_medium"
    assert request.tags["imgpipe/kind"] == "shard_run"
    decision_id = json.loads(result.cursor)["last_decision_id"]
    assert request.run_key == f"{shards[4]}@{decision_id}"
    stored = recent_decisions(conn, 1)[0]
    assert stored["action"] == "submit" and stored["submitted"] == shards[4:10]
    inputs = conn.execute(
        "SELECT inputs FROM throttle_decisions WHERE decision_id = %s", (decision_id,)
    ).fetchone()[0]
    assert inputs["runs_in_flight"] == 4 and inputs["backlog"]["shards_with_work"] == 12
    assert inputs["gpus"][0]["status"] == "ready"


def test_holds_at_the_limit(tick, conn, dagster_instance):
    shards = seed_shards(conn, dagster_instance, 12)
    for shard in shards[:10]:
        add_run(dagster_instance, "analyze_medium", shard, status=DagsterRunStatus.STARTING)

    result = tick()

    assert result.run_requests == []
    assert "at the limit: 10 runs in flight of 10" in result.skip_reason.skip_message
    assert recent_decisions(conn, 1)[0]["action"] == "hold"


def test_backfill_runs_count_against_the_limit(tick, conn, dagster_instance):
    """A multi-partition backfill run holds a slot and its whole shard range."""
    from dagster._core.test_utils import create_run_for_test

    shards = seed_shards(conn, dagster_instance, 12)
    create_run_for_test(dagster_instance, job_name="analyze_medium", status=DagsterRunStatus.STARTED,
                        tags={"imgpipe/profile": "medium", "dagster/backfill": "abc",
                              "dagster/asset_partition_range_start": shards[0],
                              "dagster/asset_partition_range_end": shards[3]})  # fmt: skip
    result = tick()
    assert [r.partition_key for r in result.run_requests] == shards[4:12]  # 9 free slots, 8 per tick, 8 left


def test_steps_down_on_timeouts_and_submits_with_the_lower_profile(tick, conn, dagster_instance):
    shards = seed_shards(conn, dagster_instance, 12)
    for shard in shards[:8]:
        add_run(dagster_instance, "analyze_medium", shard)
    seed_results(conn, ok=140, failed=60, error_class="read_timeout")

    result = tick()

    assert profile_of(result) == "conservative"
    # conservative: 8 workers, 8 in flight -> nothing more
    assert result.run_requests == []
    decision = recent_decisions(conn, 1)[0]
    assert decision["action"] == "step_down" and "timeout ratio 0.30" in decision["reason"]
    assert decision["previous_profile"] == "medium"


def test_steps_up_only_after_the_healthy_period(tick, conn, dagster_instance, clock):
    seed_shards(conn, dagster_instance, 40)
    seed_results(conn, ok=500, failed=2)
    cursor = json.dumps({"profile": "conservative"})

    first = tick(cursor)
    assert profile_of(first) == "conservative"
    clock.now += SETTINGS.healthy_period_s - 1
    almost = tick(first.cursor)
    assert profile_of(almost) == "conservative"
    clock.now += 1
    up = tick(almost.cursor)
    assert profile_of(up) == "medium"
    assert {r.job_name for r in up.run_requests} == {"analyze_medium"}
    assert recent_decisions(conn, 1)[0]["action"] == "step_up"


def test_a_bad_window_inside_the_period_restarts_it(tick, conn, dagster_instance, clock):
    seed_shards(conn, dagster_instance, 4)
    seed_results(conn, ok=500, failed=2)
    first = tick(json.dumps({"profile": "conservative"}))
    clock.now += 300
    clear_results(conn)
    seed_results(conn, ok=85, failed=15, error_class="http_5xx")  # 15%: neither healthy nor degraded
    middle = tick(first.cursor)
    clear_results(conn)
    seed_results(conn, ok=500, failed=2)
    clock.now += SETTINGS.healthy_period_s - 100
    after = tick(middle.cursor)
    assert profile_of(after) == "conservative"  # healthy again for less than the period


@pytest.fixture
def down():
    """Two GPU server URLs that refuse connections for the whole test."""
    with refused_port() as first, refused_port() as second:
        yield [f"http://127.0.0.1:{first}", f"http://127.0.0.1:{second}"]


def test_pauses_when_the_gpus_are_down_and_resumes(tick, conn, dagster_instance, clock, gpu, down):
    seed_shards(conn, dagster_instance, 6)

    paused = tick(endpoints=down)
    assert paused.run_requests == []
    assert "every GPU server is down" in paused.skip_reason.skip_message
    assert json.loads(paused.cursor)["paused"] is True
    assert recent_decisions(conn, 1)[0]["action"] == "pause"

    clock.now += 30
    still = tick(paused.cursor, endpoints=down)
    assert still.run_requests == [] and "still paused" in still.skip_reason.skip_message

    clock.now += 30
    resumed = tick(still.cursor, endpoints=[down[0], gpu.url])
    assert json.loads(resumed.cursor)["paused"] is False
    assert len(resumed.run_requests) == 6
    changes = [d["action"] for d in recent_decisions(conn, 10, changes_only=True)]
    assert changes == ["resume", "pause"]


def test_pauses_when_the_failure_ratio_shows_a_broken_network(tick, conn, dagster_instance):
    seed_shards(conn, dagster_instance, 6)
    seed_results(conn, ok=5, failed=195, error_class="dns_failure")
    result = tick()
    assert result.run_requests == []
    assert "network or the corpus is broken" in result.skip_reason.skip_message
    assert "dns_failure" in result.skip_reason.skip_message


def test_cursor_survives_a_restart(tick, conn, dagster_instance, clock):
    seed_shards(conn, dagster_instance, 30)
    seed_results(conn, ok=140, failed=60, error_class="deadline")
    before = tick(json.dumps({"profile": "aggressive"}))
    assert profile_of(before) == "medium"

    # a new daemon: a new sensor object, a new context, the stored cursor
    clock.now += 30
    after = tick(before.cursor, fresh=True)
    state = json.loads(after.cursor)
    assert state["profile"] == "medium"  # not back to the start profile
    assert state["last_change_at"] == json.loads(before.cursor)["last_change_at"]
    # run keys never repeat, even for the same shard in a later decision
    keys = {r.run_key for r in before.run_requests} & {r.run_key for r in after.run_requests}
    assert not keys


def test_tick_with_managed_mode_and_no_server_started_does_not_pause(dagster_instance, conn, database_url,
                                                                     imgpipe_home):  # fmt: skip
    seed_shards(conn, dagster_instance, 3)
    sensor = build_throttle_sensor(SETTINGS)
    with build_sensor_context(
        instance=dagster_instance,
        resources={"postgres": PostgresResource(database_url=database_url), "gpu_model": GpuModelResource()},
    ) as context:
        result = sensor(context)
    assert len(result.run_requests) == 3


def test_the_throttle_starts_stopped_unless_the_environment_asks(monkeypatch):
    monkeypatch.delenv("IMGPIPE_THROTTLE_AUTOSTART", raising=False)
    assert build_throttle_sensor(SETTINGS).default_status == DefaultSensorStatus.STOPPED
    monkeypatch.setenv("IMGPIPE_THROTTLE_AUTOSTART", "1")
    assert build_throttle_sensor(SETTINGS).default_status == DefaultSensorStatus.RUNNING
