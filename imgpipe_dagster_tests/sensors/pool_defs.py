"""Code location for the pool test: an asset in the real GPU pool that holds its slot a few seconds,
and a sensor that queues more runs of it than the pool allows, once."""

import time

from dagster import (
    DefaultSensorStatus,
    Definitions,
    RunRequest,
    SensorEvaluationContext,
    asset,
    define_asset_job,
    sensor,
)

from imgpipe_dagster.assets.config import GPU_POOL

QUEUED_RUNS = 5
HOLD_S = 4.0


@asset(pool=GPU_POOL)
def holds_a_gpu_slot() -> None:
    time.sleep(HOLD_S)


pool_job = define_asset_job("pool_job", selection=[holds_a_gpu_slot])


@sensor(job=pool_job, default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=1)
def queue_runs(context: SensorEvaluationContext):
    if context.cursor:
        return None
    context.update_cursor("queued")
    return [RunRequest(run_key=f"pool-{n}") for n in range(QUEUED_RUNS)]


defs = Definitions(assets=[holds_a_gpu_slot], jobs=[pool_job], sensors=[queue_runs])
