"""A run whose process tree is SIGKILLed (the `dagster job execute` parent and its step process) is
failed by the dead_runs sensor within its heartbeat time plus one tick, and its URLs are back in the
pool. Without the sensor the run stays STARTED forever and its URLs wait for their leases.

Real parts: `dagster job execute` of analyze_medium in its own process group against the test
Postgres (project + Dagster storage), the image server, and an external GPU endpoint that is down (the
run then holds its leases while it waits for it, as it would during a GPU outage).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from dagster import (
    DagsterEventType,
    DagsterRunStatus,
    RunRequest,
    build_run_status_sensor_context,
    build_sensor_context,
)

from imgpipe_dagster.environment import ALLOWED_NETWORKS_ENV, DEPLOYMENT_ENV, GPU_ENDPOINTS_ENV
from imgpipe_dagster.partitions import URL_SHARDS
from imgpipe_dagster.resources import PostgresResource
from imgpipe_dagster.sensors.dead_runs import DEAD_RUN_CAUSE, build_dead_run_sensor
from imgpipe_dagster.sensors.run_failure import shard_run_failures
from imgpipe_dagster.store import database as db
from imgpipe_dagster_tests.support import refused_port, seed_corpus

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 6  # the run's URL leases and heartbeat live this long without renewal
SHARD = "s000001"
START_DEADLINE_S = 240  # `dagster job execute` imports torch and Dagster on a busy 2-core machine
SENSOR_INTERVAL_S = 2


def _dagster_home(path: Path, dagster_database_url: str) -> Path:
    path.mkdir()
    config = {"storage": {"postgres": {"postgres_url": db.sqlalchemy_url(dagster_database_url)}},
              "telemetry": {"enabled": False}, "nux": {"enabled": False}}  # fmt: skip
    (path / "dagster.yaml").write_text(yaml.safe_dump(config))
    return path


def _leased_by(conn, run_id: str) -> int:
    (n,) = conn.execute("SELECT count(*) FROM corpus_urls WHERE state = 'leased' AND lease_owner = %s",
                        (run_id,)).fetchone()  # fmt: skip
    conn.commit()
    return n


def _tick(sensor, instance) -> None:
    with build_sensor_context(instance=instance, resources={"postgres": PostgresResource()}) as context:
        sensor(context)


def test_a_killed_run_is_failed_and_its_urls_go_back_to_the_pool(
    dagster_instance, dagster_database_url, database_url, conn, imgpipe_home, image_server, tmp_path
):
    urls = [image_server.image_url("rocket", "jpg", width=64, n=n) for n in range(12)]
    seed_corpus(conn, {SHARD: urls})
    dagster_instance.add_dynamic_partitions(URL_SHARDS, [SHARD])
    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump(
        {"ops": {"image_analysis": {"config": {"profile": "medium", "worker": {"lease_seconds": LEASE_S}}}}}))  # fmt: skip

    with refused_port() as gpu_port:
        env = {
            **os.environ,
            "DAGSTER_HOME": str(_dagster_home(tmp_path / "dagster_home", dagster_database_url)),
            db.DATABASE_URL_ENV: database_url,
            ALLOWED_NETWORKS_ENV: "127.0.0.0/8",
            DEPLOYMENT_ENV: "external",
            GPU_ENDPOINTS_ENV: f"http://127.0.0.1:{gpu_port}",  # down: the run holds its leases and waits
        }
        command = [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "imgpipe_dagster.definitions",
                   "-j", "analyze_medium", "-c", str(run_config), "--tags", json.dumps({"dagster/partition": SHARD})]  # fmt: skip
        parent = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        tree: list[psutil.Process] = []
        try:
            deadline = time.monotonic() + START_DEADLINE_S
            run = None
            while time.monotonic() < deadline and parent.poll() is None:
                runs = dagster_instance.get_runs()
                run = runs[0] if runs else None
                if run is not None and run.status == DagsterRunStatus.STARTED and _leased_by(conn, run.run_id):
                    break
                time.sleep(0.5)
            assert parent.poll() is None, "the run ended before it could be killed"
            assert run is not None and _leased_by(conn, run.run_id), "the run never leased its URLs"
            sensor = build_dead_run_sensor(grace_s=0, interval_s=SENSOR_INTERVAL_S, name="dead_runs_test")
            _tick(sensor, dagster_instance)
            assert dagster_instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED, "a live run failed"
            # Kill the whole run: the parent and its step process, as a lost machine would.
            root = psutil.Process(parent.pid)
            tree = [root, *root.children(recursive=True)]
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
            psutil.wait_procs(tree, timeout=30)
            killed_at = time.monotonic()
            assert dagster_instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED

            # Dead within the heartbeat's time to live; one tick after that it is failed. The extra
            # minute only absorbs a loaded machine's slow ticks.
            deadline = killed_at + LEASE_S + SENSOR_INTERVAL_S + 60
            status = DagsterRunStatus.STARTED
            ticks = 0
            while time.monotonic() < deadline:
                _tick(sensor, dagster_instance)
                ticks += 1
                status = dagster_instance.get_run_by_id(run.run_id).status
                if status == DagsterRunStatus.FAILURE:
                    break
                time.sleep(SENSOR_INTERVAL_S)
        finally:
            if parent.poll() is None:
                os.killpg(parent.pid, signal.SIGKILL)
                parent.wait()

    assert status == DagsterRunStatus.FAILURE, f"run still {status} after {ticks} sensor ticks"
    failure = dagster_instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_FAILURE).records
    event = failure[-1].event_log_entry.dagster_event
    assert event.message.startswith(DEAD_RUN_CAUSE)
    # The failure takes the ordinary path: shard_run_failures records its cause and retries the shard.
    context = build_run_status_sensor_context(
        sensor_name="shard_run_failures", dagster_event=event, dagster_instance=dagster_instance,
        dagster_run=dagster_instance.get_run_by_id(run.run_id), resources={"postgres": PostgresResource()},
    ).for_run_failure()  # fmt: skip
    retry = shard_run_failures(context)
    assert isinstance(retry, RunRequest) and retry.partition_key == SHARD
    (cause,) = conn.execute("SELECT cause FROM run_failures WHERE run_id = %s", (run.run_id,)).fetchone()
    assert cause.startswith("DeadRun: imgpipe dead-run detector")
    assert _leased_by(conn, run.run_id) == 0
    states = conn.execute("SELECT state::text, count(*), max(attempts) FROM corpus_urls GROUP BY 1").fetchall()
    assert states == [("pending", len(urls), 0)]  # all back in the pool, no retry spent
    assert conn.execute("SELECT count(*) FROM run_heartbeats").fetchone()[0] == 0
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
