"""The code location loads and validates as `dagster definitions validate` does, and its shape is
pinned so an unintended lineage, job, sensor or schedule change shows up in review.

The shape lives in definitions_snapshot.json beside this file. After an intended change, refresh it
and commit the diff with the change:

    UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest imgpipe_dagster_tests/foundation/test_definitions.py
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import (
    AssetCheckResult,
    AssetSelection,
    DailyPartitionsDefinition,
    DefaultSensorStatus,
    Definitions,
    RunRequest,
    ScheduleDefinition,
    asset,
    asset_check,
    define_asset_job,
    sensor,
)

from imgpipe_dagster.store.database import DAGSTER_DATABASE_URL_ENV, sqlalchemy_url

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).with_name("definitions_snapshot.json")
UPDATE_ENV = "UPDATE_SNAPSHOTS"


def test_definitions_validate_like_the_cli(dagster_database_url):
    # The project's dagster.yaml (picked up from the checkout) reads its storage URL from the environment.
    env = {**os.environ, DAGSTER_DATABASE_URL_ENV: sqlalchemy_url(dagster_database_url)}
    result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-m",
                             "imgpipe_dagster.definitions"], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------- the snapshot


def _partitions_name(partitions_def) -> str | None:
    if partitions_def is None:
        return None
    return getattr(partitions_def, "name", None) or type(partitions_def).__name__


def definitions_snapshot(defs: Definitions) -> dict:
    """The reviewable shape of a code location, as plain sorted data."""
    graph = defs.resolve_asset_graph()
    checks: dict[str, list[str]] = {}
    for check_key in graph.asset_check_keys:
        checks.setdefault(check_key.asset_key.to_user_string(), []).append(check_key.name)
    assets = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        name = key.to_user_string()
        assets[name] = {
            "deps": sorted(parent.to_user_string() for parent in node.parent_keys),
            "group": node.group_name,
            "partitions": _partitions_name(node.partitions_def),
            "checks": sorted(checks.get(name, [])),
        }
    jobs = {}
    for job in defs.resolve_all_job_defs():
        if job.name.startswith("__"):  # Dagster's implicit all-assets job
            continue
        jobs[job.name] = {
            "assets": sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys),
            "partitions": _partitions_name(job.partitions_def),
        }
    sensors = {
        s.name: {
            "kind": s.sensor_type.value,
            "jobs": sorted(target.job_name for target in s.targets),
            "default_status": s.default_status.value,
            "minimum_interval_s": s.minimum_interval_seconds,
        }
        for s in defs.sensors or []
    }
    schedules = {
        s.name: {
            "cron": s.cron_schedule,
            "timezone": s.execution_timezone,
            "job": s.job_name,
            "default_status": s.default_status.value,
        }
        for s in defs.schedules or []
    }
    return {"assets": assets, "jobs": jobs, "sensors": sensors, "schedules": schedules}


def _as_text(snapshot: dict) -> str:
    return json.dumps(snapshot, indent=2, sort_keys=True) + "\n"


def test_the_code_location_matches_its_committed_snapshot():
    from imgpipe_dagster.definitions import defs

    current = _as_text(definitions_snapshot(defs))
    if os.environ.get(UPDATE_ENV) == "1":
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{UPDATE_ENV}=1 in CI would pass any change: refresh the snapshot locally and commit it")
        SNAPSHOT.write_text(current)
        pytest.skip(f"{UPDATE_ENV}=1: wrote {SNAPSHOT.name}, nothing compared; review `git diff` and commit it")
    expected = SNAPSHOT.read_text()
    if current != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), current.splitlines(True),
                                            f"{SNAPSHOT.name} (committed)", "imgpipe_dagster.definitions (now)"))  # fmt: skip
        pytest.fail(
            "the asset graph, jobs, sensors or schedules changed.\n"
            f"If the change is intended: {UPDATE_ENV}=1 .venv/bin/python -m pytest {Path(__file__).relative_to(REPO)}"
            f" and commit {SNAPSHOT.name}.\n{diff}",
            pytrace=False,
        )


def test_the_snapshot_records_lineage_checks_jobs_sensors_and_schedules():
    """On a small code location written here: each part the snapshot promises is really in it."""
    days = DailyPartitionsDefinition(start_date="2026-01-01")

    @asset(group_name="raw")
    def source() -> None: ...

    @asset(deps=[source], group_name="derived", partitions_def=days)
    def daily() -> None: ...

    @asset_check(asset=daily)
    def not_empty() -> AssetCheckResult:
        return AssetCheckResult(passed=True)

    job = define_asset_job("daily_job", selection=AssetSelection.assets(daily), partitions_def=days)

    @sensor(job=job, minimum_interval_seconds=45, default_status=DefaultSensorStatus.RUNNING)
    def watcher():
        yield RunRequest()

    nightly = ScheduleDefinition(name="nightly", job_name="source_job", cron_schedule="0 3 * * *",
                                 execution_timezone="Europe/Berlin")  # fmt: skip
    defs = Definitions(assets=[source, daily], asset_checks=[not_empty], sensors=[watcher], schedules=[nightly],
                       jobs=[job, define_asset_job("source_job", selection=[source])])  # fmt: skip

    assert definitions_snapshot(defs) == {
        "assets": {
            "source": {"deps": [], "group": "raw", "partitions": None, "checks": []},
            "daily": {"deps": ["source"], "group": "derived", "partitions": "DailyPartitionsDefinition",
                      "checks": ["not_empty"]},
        },
        "jobs": {
            "daily_job": {"assets": ["daily"], "partitions": "DailyPartitionsDefinition"},
            "source_job": {"assets": ["source"], "partitions": None},
        },
        "sensors": {"watcher": {"kind": "STANDARD", "jobs": ["daily_job"], "default_status": "RUNNING",
                                "minimum_interval_s": 45}},
        "schedules": {"nightly": {"cron": "0 3 * * *", "timezone": "Europe/Berlin", "job": "source_job",
                                  "default_status": "STOPPED"}},
    }  # fmt: skip
