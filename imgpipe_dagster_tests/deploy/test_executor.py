"""The jobs' executor runs in-process inside a daemonic process (a Celery worker's pool child), where
Dagster's default multiprocess executor cannot start its step processes; elsewhere it is the default."""

from __future__ import annotations

import multiprocessing
import os

from dagster import job, multi_or_in_process_executor, op

from imgpipe_dagster.executor import in_daemonic_process, shard_run_executor

# spawn, not Dagster's default forkserver: a forkserver outlives the test session
SPAWN = {"execution": {"config": {"multiprocess": {"start_method": {"spawn": {}}}}}}


@op
def report_process() -> int:
    return os.getpid()


@job(executor_def=shard_run_executor)
def probe_ours():
    report_process()


@job(executor_def=multi_or_in_process_executor)
def probe_default():
    report_process()


def _execute(job_name: str, dagster_home: str, queue) -> None:
    from dagster import DagsterInstance, execute_job, reconstructable

    os.environ["DAGSTER_HOME"] = dagster_home
    target = {"probe_ours": probe_ours, "probe_default": probe_default}[job_name]
    try:
        with (
            DagsterInstance.get() as instance,
            execute_job(reconstructable(target), instance=instance, run_config=SPAWN) as result,
        ):
            step_pid = result.output_for_node("report_process") if result.success else None
            queue.put((in_daemonic_process(), result.success, step_pid == os.getpid()))
    except Exception as error:  # the parent waits on the queue: hand it the failure instead of nothing
        queue.put((in_daemonic_process(), False, repr(error)))


def _in_daemonic_child(job_name: str, dagster_home: str):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_execute, args=(job_name, dagster_home, queue), daemon=True)
    child.start()
    try:
        return queue.get(timeout=120)
    finally:
        child.join(30)


def test_in_a_daemonic_process_our_executor_runs_the_steps_in_process(tmp_path):
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    daemonic, success, same_process = _in_daemonic_child("probe_ours", str(tmp_path))
    assert daemonic and success and same_process


def test_in_a_daemonic_process_the_default_executor_fails(tmp_path):
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    daemonic, success, _ = _in_daemonic_child("probe_default", str(tmp_path))
    assert daemonic and not success
