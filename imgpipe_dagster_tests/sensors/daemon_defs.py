"""Code location for the daemon test: the analysis asset and jobs, and the throttle sensor running
by default with a short window (the real definitions.py also holds url_corpus and the report)."""

from dagster import DefaultSensorStatus, Definitions

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.definitions import deployment_resources
from imgpipe_dagster.environment import GPU_BASE_PORT_ENV, read_environment
from imgpipe_dagster.jobs import ANALYSIS_JOBS
from imgpipe_dagster.sensors.throttle import build_throttle_sensor
from imgpipe_dagster.throttle import ThrottleSettings

# The test starts the managed GPU server on a port and tells the runs which one (the documented variable).
GPU_PORT_ENV = GPU_BASE_PORT_ENV

throttle = build_throttle_sensor(
    ThrottleSettings.from_env(start_profile="conservative"), default_status=DefaultSensorStatus.RUNNING
)

defs = Definitions(
    assets=[image_analysis],
    jobs=list(ANALYSIS_JOBS.values()),
    sensors=[throttle],
    resources=deployment_resources(read_environment()),
)
