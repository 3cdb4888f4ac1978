"""Shard runs on two Celery "nodes" through dagster-celery's run launcher, and one node dying mid-run.

Real parts: a private Redis (redis-server on a unix socket, nothing on a TCP port), the instance config
of deploy/celery/dagster.yaml as documented (only the monitoring intervals shortened), a real
`dagster-daemon` (throttle, run queue, run monitoring, the dead-run and run-failure sensors) and two
workers started with the documented `dagster-celery worker start` command. Each node has its own queue,
its own IMGPIPE_HOME and its own managed tiny-model GPU server on the CPU (own port); the nodes share the
project database and Dagster's storage, as real nodes would.

The throttle places the shards on both nodes by their free slots; once both have finished a shard, node
B's worker is SIGKILLed (its whole process group: the machine is gone) while it holds a run. Celery never
notices, so that run stays STARTED until the dead-run sensor sees its heartbeat stop and fails it; the
run-failure sensor gives its shard back (default queue), node A finishes everything, `imgpipe verify` is
clean and every URL has exactly one result.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytest.importorskip("dagster_celery")

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter  # noqa: E402

from imgpipe_dagster.paths import gpu_server_records_dir  # noqa: E402
from imgpipe_dagster.processes import stop_process_group  # noqa: E402
from imgpipe_dagster.store import database as db  # noqa: E402
from imgpipe_dagster.throttle.placement import QUEUE_TAG  # noqa: E402
from imgpipe_dagster_tests.deploy.celery_defs import LEASE_S  # noqa: E402
from imgpipe_dagster_tests.private_redis import PrivateRedis  # noqa: E402

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NODES = ("node-a", "node-b")
SHARDS = 8
URLS_PER_SHARD = 10
# Both phases on a busy 2-core machine: two workers, a daemon and two GPU servers start and import torch.
DEADLINE_S = 420
POLL_S = 2.0


def _dagster_home(path: Path) -> Path:
    """deploy/celery/dagster.yaml as documented; only the monitoring is made to look every few seconds."""
    path.mkdir()
    config = yaml.safe_load((REPO_ROOT / "deploy" / "celery" / "dagster.yaml").read_text())
    config["run_monitoring"].update({"poll_interval_seconds": 3, "start_timeout_seconds": 240})
    config["concurrency"]["runs"]["max_concurrent_runs"] = 4
    config["sensors"]["num_workers"] = 3
    (path / "dagster.yaml").write_text(yaml.safe_dump(config))
    (path / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"python_module": {
        "module_name": "imgpipe_dagster_tests.deploy.celery_defs", "working_directory": str(REPO_ROOT)}}]}))  # fmt: skip
    return path


def _queue_of(run) -> str | None:
    return run.tags.get(QUEUE_TAG)


def _analysis_runs(instance):
    return instance.get_runs(RunsFilter(tags={"imgpipe/kind": "shard_run"}))


def _leased_by(conn, run_id: str) -> int:
    (count,) = conn.execute(
        "SELECT count(*) FROM corpus_urls WHERE state = 'leased' AND lease_owner = %s", (run_id,)
    ).fetchone()
    conn.commit()
    return count


@pytest.mark.timeout(DEADLINE_S + 180)
def test_two_celery_nodes_share_the_shards_and_a_killed_node_loses_nothing(
    dagster_database_url, database_url, conn, image_server, tiny_model_dir, tmp_path, monkeypatch
):
    from imgpipe_dagster.corpus import ingest_files, sync_shard_partitions
    from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
    from imgpipe_dagster.profiles import resolve
    from imgpipe_dagster.resources import GpuModelResource
    from imgpipe_dagster_tests.web.image_server import photo_names

    names = photo_names()
    # a short wait on every image: a run holds its URLs for a few seconds, so there is a "mid-run"
    urls = [
        image_server.image_url(names[i % len(names)], "jpg", width=64, n=i) + "&delay=2"
        for i in range(SHARDS * URLS_PER_SHARD)
    ]
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("url\n" + "\n".join(urls) + "\n")
    report = ingest_files(conn, [corpus], shard_size=URLS_PER_SHARD)
    shards = set(report.shards_added)
    assert len(shards) == SHARDS

    dagster_home = _dagster_home(tmp_path / "dagster_home")
    homes = {node: tmp_path / node for node in NODES}
    gpu_profile = resolve("conservative")[1]
    for home in homes.values():
        shutil.copytree(tiny_model_dir, home / "models" / "tiny-qwen2-vl")
        # each node's GPU server, warm before its first run (as a node that has worked before)
        monkeypatch.setenv("IMGPIPE_HOME", str(home))
        GpuModelResource(base_port=0).launcher(gpu_profile).ensure(["cpu"], base_port=0)

    with PrivateRedis() as redis:
        common = {
            **os.environ,
            # `dagster-celery worker start` runs `celery` from PATH, as in an activated environment
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "DAGSTER_HOME": str(dagster_home),
            "IMGPIPE_CELERY_BROKER": redis.url,
            db.DATABASE_URL_ENV: database_url,
            db.DAGSTER_DATABASE_URL_ENV: db.sqlalchemy_url(dagster_database_url),
            "IMGPIPE_ALLOWED_NETWORKS": "127.0.0.0/8",
            "IMGPIPE_GPU_DEVICES": "cpu",
            "IMGPIPE_GPU_BASE_PORT": "0",
        }
        for name, value in common.items():
            if name.startswith(("IMGPIPE_", "DAGSTER_")):
                monkeypatch.setenv(name, value)
        instance = DagsterInstance.get()
        sync_shard_partitions(instance, conn)

        processes: dict[str, subprocess.Popen] = {}
        logs: dict[str, Path] = {}

        def start(name: str, argv: list[str], home: Path) -> None:
            logs[name] = tmp_path / f"{name}.log"
            processes[name] = subprocess.Popen(
                argv, cwd=REPO_ROOT, env={**common, "IMGPIPE_HOME": str(home)},
                stdout=logs[name].open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

        try:
            for node, home in homes.items():
                start(node, [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                             "-y", str(REPO_ROOT / "deploy" / "celery" / "worker.yaml"),
                             "-q", f"{node},dagster", "-n", node, "--", "--concurrency=1"], home)  # fmt: skip
            (tmp_path / "daemon-home").mkdir()
            start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(dagster_home / "workspace.yaml")],
                  tmp_path / "daemon-home")  # fmt: skip
            deadline = time.monotonic() + DEADLINE_S

            def alive() -> None:
                for name in ("daemon", "node-a"):
                    assert processes[name].poll() is None, f"{name} exited: {logs[name].read_text()[-3000:]}"

            # Phase 1: shards ran on both nodes, and node B is in the middle of another one.
            victim = None
            while victim is None:
                alive()
                assert time.monotonic() < deadline, f"phase 1 not reached: {_describe(instance)}"
                runs = _analysis_runs(instance)
                succeeded = Counter(_queue_of(r) for r in runs if r.status == DagsterRunStatus.SUCCESS)
                assert sum(succeeded.values()) < SHARDS, (
                    f"no run of node B caught mid-run: {_describe(instance)}"
                )
                if all(succeeded[node] >= 1 for node in NODES):
                    for run in runs:
                        if (run.status == DagsterRunStatus.STARTED and _queue_of(run) == "node-b"
                                and _leased_by(conn, run.run_id) > 0):  # fmt: skip
                            victim = run
                            break
                if victim is None:
                    time.sleep(POLL_S / 4)
            os.killpg(processes["node-b"].pid, signal.SIGKILL)
            killed_at = time.monotonic()
            processes["node-b"].wait(30)

            # Phase 2: the dead node's run is failed, its shard finishes on node A, nothing is lost.
            failed_after = None
            while True:
                alive()
                assert time.monotonic() < deadline, f"phase 2 not finished: {_describe(instance)}"
                run = instance.get_run_by_id(victim.run_id)
                if failed_after is None and run.status == DagsterRunStatus.FAILURE:
                    failed_after = time.monotonic() - killed_at
                runs = _analysis_runs(instance)
                done_shards = {
                    r.tags["dagster/partition"] for r in runs if r.status == DagsterRunStatus.SUCCESS
                }
                (unfinished,) = conn.execute(
                    "SELECT count(*) FROM corpus_urls WHERE state NOT IN ('done', 'failed_permanent')"
                ).fetchone()
                conn.commit()
                if failed_after is not None and done_shards == shards and unfinished == 0:
                    break
                time.sleep(POLL_S)
        finally:
            for process in processes.values():
                stop_process_group(process, grace_s=20)
            for home in homes.values():
                GpuServerLauncher(gpu_server_records_dir(home)).stop()
            for name, path in logs.items():
                if path.exists():
                    print(f"--- {name} (tail)\n{path.read_text(errors='replace')[-2500:]}")

    runs = _analysis_runs(instance)
    print(f"node B's run {victim.run_id} failed {failed_after:.1f} s after the kill (leases {LEASE_S} s)")
    print(_describe(instance))
    # the dead run was failed by the dead-run detector, not by Celery or a timeout
    victim_failure = instance.get_run_by_id(victim.run_id)
    assert victim_failure.status == DagsterRunStatus.FAILURE
    messages = [e.message or "" for e in instance.all_logs(victim.run_id)]
    assert any("dead-run detector" in m for m in messages), messages[-5:]
    # its shard was run again and succeeded, not on the dead node
    victim_shard = victim.tags["dagster/partition"]
    reruns = [r for r in runs if r.tags["dagster/partition"] == victim_shard and r.run_id != victim.run_id]
    assert any(r.status == DagsterRunStatus.SUCCESS and _queue_of(r) != "node-b" for r in reruns)
    # every shard succeeded; shards ran on both nodes before the kill
    succeeded = [r for r in runs if r.status == DagsterRunStatus.SUCCESS]
    assert {r.tags["dagster/partition"] for r in succeeded} == shards
    assert {_queue_of(r) for r in succeeded} >= set(NODES)

    # nothing lost, nothing twice: one result row per URL, all final, verify clean
    states = dict(conn.execute("SELECT state::text, count(*) FROM corpus_urls GROUP BY 1").fetchall())
    assert states == {"done": len(urls)}
    (results, distinct) = conn.execute(
        "SELECT count(*), count(DISTINCT url_hash) FROM url_analysis_results"
    ).fetchone()
    assert results == distinct == len(urls)
    verify = subprocess.run(
        [str(BIN / "imgpipe"), "verify", "--require-complete"], cwd=REPO_ROOT,
        env={**os.environ, db.DATABASE_URL_ENV: database_url}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _describe(instance) -> str:
    return "; ".join(
        f"{r.tags.get('dagster/partition')}@{_queue_of(r) or 'default'} {r.status.value}"
        for r in sorted(_analysis_runs(instance), key=lambda r: r.tags.get("dagster/partition", ""))
    )
