"""Code location for the daemon test: the analysis asset and jobs, and the throttle sensor running
by default with a short window (the real definitions.py also holds url_corpus and the report)."""

import os

from dagster import DefaultSensorStatus, Definitions

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.jobs import ANALYSIS_JOBS
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.sensors.throttle import build_throttle_sensor
from imgpipe_dagster.throttle import ThrottleSettings

# The test starts the managed GPU server on a free port and tells the runs which one.
GPU_PORT_ENV = "IMGPIPE_TEST_GPU_BASE_PORT"

throttle = build_throttle_sensor(
    ThrottleSettings.from_env(start_profile="conservative"), default_status=DefaultSensorStatus.RUNNING
)

defs = Definitions(
    assets=[image_analysis],
    jobs=list(ANALYSIS_JOBS.values()),
    sensors=[throttle],
    resources={
        "postgres": PostgresResource(),
        "gpu_model": GpuModelResource(base_port=int(os.environ.get(GPU_PORT_ENV, "8000"))),
        "fetcher": FetcherResource(),
    },
)
