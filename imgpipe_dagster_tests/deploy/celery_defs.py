"""Code location of the two-node Celery test: the analysis jobs with short URL leases (a killed node's run
is found dead in seconds, not minutes), the throttle placing shards on nodes, the run-failure and dead-run
sensors ticking every few seconds. Everything else is the product's own code."""

from dagster import DefaultSensorStatus, Definitions, define_asset_job, run_failure_sensor

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.definitions import deployment_resources
from imgpipe_dagster.environment import read_environment
from imgpipe_dagster.executor import shard_run_executor
from imgpipe_dagster.jobs import ANALYSIS, analysis_job_name, analysis_job_tags
from imgpipe_dagster.partitions import url_shards
from imgpipe_dagster.profiles import PROFILE_NAMES, profile_run_config
from imgpipe_dagster.resources import PostgresResource
from imgpipe_dagster.sensors.dead_runs import build_dead_run_sensor
from imgpipe_dagster.sensors.run_failure import handle_failure
from imgpipe_dagster.sensors.throttle import build_throttle_sensor
from imgpipe_dagster.throttle import ThrottleSettings

LEASE_S = 8  # URL leases and the run heartbeat live this long without renewal
SENSOR_INTERVAL_S = 3


def _short_lease_config(profile: str) -> dict:
    config = profile_run_config(profile)
    image_analysis_config = config["ops"]["image_analysis"]["config"]
    worker = {**image_analysis_config["worker"], "lease_seconds": LEASE_S}
    return {**config, "ops": {"image_analysis": {"config": {**image_analysis_config, "worker": worker}}}}


JOBS = [
    define_asset_job(
        analysis_job_name(profile),
        selection=ANALYSIS,
        partitions_def=url_shards,
        config=_short_lease_config(profile),
        tags=analysis_job_tags(profile),
    )
    for profile in PROFILE_NAMES
]

throttle = build_throttle_sensor(
    ThrottleSettings.from_env(start_profile="conservative"),
    default_status=DefaultSensorStatus.RUNNING,
    jobs=JOBS,
    interval_s=SENSOR_INTERVAL_S,
)


@run_failure_sensor(
    name="shard_run_failures",
    monitored_jobs=JOBS,
    request_jobs=JOBS,
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
)
def shard_run_failures(context, postgres: PostgresResource):
    return handle_failure(context, postgres)


dead_runs = build_dead_run_sensor(grace_s=2.0, interval_s=SENSOR_INTERVAL_S)

defs = Definitions(
    assets=[image_analysis],
    jobs=JOBS,
    sensors=[throttle, shard_run_failures, dead_runs],
    resources=deployment_resources(read_environment()),
    executor=shard_run_executor,
)
