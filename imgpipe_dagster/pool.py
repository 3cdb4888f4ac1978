"""The GPU concurrency pool: Dagster's own limit on shard runs in flight, whoever launches them.

image_analysis is in the ``imgpipe_gpu`` pool (``pool=`` on the asset); dagster.yaml sets
``concurrency.pools.granularity: run``, so Dagster's run queue starts a run only while the pool has a
free slot: throttle runs, nightly runs, retries, manual launches and backfills alike. The limit is
the ``max_concurrent_workers`` of the profile in force: dagster.yaml's ``default_limit`` is the start
profile's (medium, 10), and every throttle tick sets the pool to the limit of its current profile,
so the throttle and the pool always agree.
"""

from __future__ import annotations

from dagster import DagsterInstance

from imgpipe_dagster.assets.config import GPU_POOL


def pool_limit(instance: DagsterInstance) -> int | None:
    """The pool's explicit limit, or None while dagster.yaml's default applies."""
    if GPU_POOL not in instance.event_log_storage.get_concurrency_keys():
        return None
    return instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count


def sync_pool_limit(instance: DagsterInstance, limit: int) -> bool:
    """Sets the pool to ``limit`` slots when it differs; True when it changed."""
    if pool_limit(instance) == limit:
        return False
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, limit)
    return True
