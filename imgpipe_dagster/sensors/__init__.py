"""Sensors: the throttle (feeder), new corpus files, run failures, dead runs. See docs/SENSORS.md."""

from imgpipe_dagster.sensors.corpus import corpus_files
from imgpipe_dagster.sensors.dead_runs import dead_runs_sensor
from imgpipe_dagster.sensors.run_failure import shard_run_failures
from imgpipe_dagster.sensors.throttle import throttle_sensor

SENSORS: list = [throttle_sensor, corpus_files, shard_run_failures, dead_runs_sensor]
