"""The executor of every job: Dagster's default (multiprocess, or in-process on request), except that a run
inside a daemonic process executes in-process.

A Celery worker (the ``CeleryRunLauncher``'s run worker) executes each run inside a daemonic pool
process, and a daemonic process may not start children: the multiprocess executor fails there
("daemonic processes are not allowed to have children"). Choosing at run start, from the process the
run finds itself in, lets one job definition serve the local daemon, a Celery node and a Kubernetes pod
without a per-deployment run config. The run config keeps the default executor's shape
(``execution: {config: {in_process: {}}}`` still forces in-process anywhere).
"""

from __future__ import annotations

import multiprocessing

from dagster import Field, Selector, executor
from dagster._core.definitions.executor_definition import (
    IN_PROC_CONFIG,
    MULTI_PROC_CONFIG,
    _core_in_process_executor_creation,
    _core_multiprocess_executor_creation,
    multiple_process_executor_requirements,
)


def in_daemonic_process() -> bool:
    """True inside a daemonic process (a Celery prefork pool child: billiard marks the stdlib's current
    process as its own daemonic one)."""
    return bool(multiprocessing.current_process().daemon)


def _requirements(executor_config: dict):
    return multiple_process_executor_requirements() if "multiprocess" in executor_config else []


@executor(
    name="shard_run_executor",
    config_schema=Field(
        Selector({"multiprocess": MULTI_PROC_CONFIG, "in_process": IN_PROC_CONFIG}),
        default_value={"multiprocess": {}},
    ),
    requirements=_requirements,
)
def shard_run_executor(init_context):
    """Multiprocess unless the run config asks for in-process or the run is in a daemonic process."""
    config = init_context.executor_config
    if "in_process" in config:
        return _core_in_process_executor_creation(config["in_process"])
    multiprocess = config["multiprocess"]
    if in_daemonic_process():
        return _core_in_process_executor_creation(
            {
                "retries": multiprocess["retries"],
                "step_dependency_config": multiprocess.get("step_dependency_config"),
            }
        )
    return _core_multiprocess_executor_creation(multiprocess)
