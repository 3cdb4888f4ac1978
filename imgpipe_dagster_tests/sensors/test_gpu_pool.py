"""The GPU pool holds every entry point to the profile's limit: a real `dagster-daemon` with the
project's dagster.yaml concurrency settings is given more queued runs than the pool allows, and no
more than the pool's limit are ever in progress at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus

from imgpipe_dagster.assets.config import DEFAULT_PROFILE
from imgpipe_dagster.pool import pool_limit, sync_pool_limit
from imgpipe_dagster.processes import stop_process_group
from imgpipe_dagster.profiles import resolve
from imgpipe_dagster.store import database as db
from imgpipe_dagster_tests.sensors.pool_defs import QUEUED_RUNS

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 240
POOL_LIMIT = 2


def project_concurrency() -> dict:
    return yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())["concurrency"]


def test_the_pools_default_is_the_start_profiles_worker_limit():
    pools = project_concurrency()["pools"]
    assert pools["granularity"] == "run"
    assert pools["default_limit"] == resolve(DEFAULT_PROFILE)[0].max_concurrent_workers


def _max_overlap(records) -> int:
    """The most runs in progress at one moment, from their start and end times."""
    edges = sorted([(r.start_time, 1) for r in records] + [(r.end_time, -1) for r in records],
                   key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same instant
    current = peak = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


@pytest.mark.slow
def test_no_more_runs_than_the_pool_allows_are_in_progress(tmp_path, dagster_database_url, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = {
        "storage": {"postgres": {"postgres_url": db.sqlalchemy_url(dagster_database_url)}},
        "concurrency": project_concurrency(),  # the project's run and pool settings, as shipped
        "run_monitoring": {"enabled": False},
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
    }
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    (home / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"python_module": {
        "module_name": "imgpipe_dagster_tests.sensors.pool_defs", "working_directory": str(REPO_ROOT)}}]}))  # fmt: skip
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = DagsterInstance.get()
    # what a throttle tick does with the profile in force; 2 slots so a few runs show the limit
    assert sync_pool_limit(instance, POOL_LIMIT) and pool_limit(instance) == POOL_LIMIT
    assert not sync_pool_limit(instance, POOL_LIMIT)  # unchanged: nothing written

    env = {**os.environ, "DAGSTER_HOME": str(home)}
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(home / "workspace.yaml")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    in_progress_seen = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and daemon.poll() is None:
            runs = instance.get_runs()
            in_progress_seen.append(sum(r.status in (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)
                                        for r in runs))  # fmt: skip
            if len(runs) == QUEUED_RUNS and all(r.status == DagsterRunStatus.SUCCESS for r in runs):
                break
            assert not any(r.status == DagsterRunStatus.FAILURE for r in runs), [r.run_id for r in runs]
            time.sleep(0.5)
        runs = instance.get_runs()
        assert len(runs) == QUEUED_RUNS and all(r.status == DagsterRunStatus.SUCCESS for r in runs), (
            [r.status.value for r in runs], daemon.poll())
    finally:
        stop_process_group(daemon, grace_s=30)
        if daemon.stdout is not None:
            print(daemon.stdout.read().decode(errors="replace")[-3000:])

    assert max(in_progress_seen) <= POOL_LIMIT, in_progress_seen
    records = instance.get_run_records()
    assert _max_overlap(records) <= POOL_LIMIT
    assert _max_overlap(records) == POOL_LIMIT  # the pool was used, not just the queue serialising runs
