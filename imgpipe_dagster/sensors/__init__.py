"""Sensors: the throttle (feeder), new corpus files, run failures, dead runs. See docs/SENSORS.md."""

from dagster import AssetSelection, AutomationConditionSensorDefinition, DefaultSensorStatus

from imgpipe_dagster.sensors.corpus import corpus_files
from imgpipe_dagster.sensors.dead_runs import dead_runs_sensor
from imgpipe_dagster.sensors.run_failure import shard_run_failures
from imgpipe_dagster.sensors.throttle import throttle_sensor

# Evaluates progress_report's automation condition (after shard runs, every 15 minutes). Running by
# default, unlike Dagster's own default automation sensor: the report is cheap and starts nothing else.
report_refresh = AutomationConditionSensorDefinition(
    "report_refresh", target=AssetSelection.assets("progress_report"), default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60, description="Refreshes progress_report after shard runs and every 15 minutes.",
)  # fmt: skip

SENSORS: list = [throttle_sensor, corpus_files, shard_run_failures, dead_runs_sensor, report_refresh]
