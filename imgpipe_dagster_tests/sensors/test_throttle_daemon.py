"""A real `dagster-daemon` drives two shards to completion through the throttle sensor alone.

Everything is real and on loopback: the test Postgres (project + Dagster storage), the image
server, the daemon process (sensor daemon, run queue, run workers as subprocesses) and a managed
GPU server on the CPU with the tiny random model, started by the first run. Nobody launches a run:
the test only ingests a corpus and waits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.processes import stop_process_group
from imgpipe_dagster.store import database as db

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 210


@pytest.fixture
def dagster_home(tmp_path, dagster_database_url):
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = {
        "storage": {"postgres": {"postgres_url": db.sqlalchemy_url(dagster_database_url)}},
        "concurrency": {"runs": {"max_concurrent_runs": 4}},
        "run_monitoring": {"enabled": False},
        "sensors": {"use_threads": True, "num_workers": 2},
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
    }
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    (home / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"python_module": {
        "module_name": "imgpipe_dagster_tests.sensors.daemon_defs", "working_directory": str(REPO_ROOT)}}]}))  # fmt: skip
    return home


@pytest.mark.slow
def test_the_throttle_alone_drives_two_shards_to_completion(
    dagster_home, database_url, conn, imgpipe_home, image_server, tiny_model_dir, tmp_path, monkeypatch
):
    from imgpipe_dagster.corpus import ingest_files, sync_shard_partitions
    from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
    from imgpipe_dagster.profiles import resolve
    from imgpipe_dagster.resources import GpuModelResource
    from imgpipe_dagster_tests.sensors.daemon_defs import GPU_PORT_ENV
    from imgpipe_dagster_tests.web.image_server import photo_names

    # The runs' managed GPU server uses the tiny model under IMGPIPE_HOME: build it once, up front.
    shutil.copytree(tiny_model_dir, imgpipe_home / "models" / "tiny-qwen2-vl")
    monkeypatch.setenv("IMGPIPE_HOME", str(imgpipe_home))
    corpus = tmp_path / "corpus.csv"
    names = photo_names()[:2]
    urls = [image_server.image_url(name, ext, width=64) for name in names for ext in ("jpg", "png")]
    corpus.write_text("url\n" + "\n".join(urls) + "\n")
    report = ingest_files(conn, [corpus], shard_size=2)
    assert len(report.shards_added) == 2

    # Warm the managed GPU server the runs will reuse (CPU, tiny model), as a previous run would have
    # left it: loading torch and the model on a busy 2-core machine takes longer than the runs.
    # Base port 0: the server binds a free port and its record says which; the runs' resource (also
    # base port 0) finds it in the same slot.
    gpu_profile = resolve("conservative")[1]
    launcher = GpuModelResource(base_port=0).launcher(gpu_profile)
    launcher.ensure(["cpu"], base_port=0)

    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        db.DATABASE_URL_ENV: database_url,
        "IMGPIPE_HOME": str(imgpipe_home),
        "IMGPIPE_ALLOWED_NETWORKS": "127.0.0.0/8",
        "IMGPIPE_GPU_DEVICES": "cpu",
        GPU_PORT_ENV: "0",
    }
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    instance = DagsterInstance.get()
    sync_shard_partitions(instance, conn)
    shards = list(report.shards_added)

    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(dagster_home / "workspace.yaml")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + DEADLINE_S
        finished = False
        while time.monotonic() < deadline and daemon.poll() is None:
            states = dict(conn.execute(
                "SELECT state::text, count(*) FROM corpus_urls GROUP BY 1").fetchall())  # fmt: skip
            conn.commit()
            runs = instance.get_runs(RunsFilter(tags={"imgpipe/source": "throttle"}))
            if (
                set(states) <= {"done", "failed_permanent"}
                and runs
                and all(r.status == DagsterRunStatus.SUCCESS for r in runs)
                and {r.tags.get("dagster/partition") for r in runs} >= set(shards)
            ):
                finished = True
                break
            time.sleep(3)
        runs = instance.get_runs(RunsFilter(tags={"imgpipe/source": "throttle"}))
        assert finished, (
            f"not finished in {DEADLINE_S}s: states {states}, runs "
            f"{[(r.tags.get('dagster/partition'), r.status.value) for r in runs]}"
        )
        assert {r.tags["dagster/partition"] for r in runs} == set(shards)
        assert all(
            r.tags["imgpipe/kind"] == "shard_run" and r.job_name == "analyze_conservative" for r in runs
        )
        assert len(instance.get_runs()) == len(runs)  # every run came from the throttle
        done = conn.execute("SELECT count(*) FROM url_analysis_results WHERE status = 'ok'").fetchone()[0]
        assert done == len(urls)
        decisions = [row[0] for row in conn.execute(
            "SELECT action FROM throttle_decisions ORDER BY decision_id").fetchall()]  # fmt: skip
        assert decisions[0] == "submit"
    finally:
        stop_process_group(daemon, grace_s=30)
        GpuServerLauncher(gpu_server_records_dir(imgpipe_home)).stop()
        if daemon.stdout is not None:
            tail = daemon.stdout.read().decode(errors="replace")[-3000:]
            print(tail)
