"""A managed GPU server SIGKILLed mid-run comes back by itself: the run's watchdog restarts it with
the same settings on the same port, the run finishes with every URL final, the run log holds the
restart and the router's "resumed" line, and `imgpipe status` lists the server as dead meanwhile.

Real parts: a Dagster materialize of image_analysis, the image server, a tiny-model GPU server process
on the CPU (managed mode, any free port), Postgres. Nobody but the run starts a server after the kill.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from dagster import materialize

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.cli.status import render
from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.partitions import URL_SHARDS
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.profiles import resolve
from imgpipe_dagster.status import collect
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster_tests.assets.test_analysis import resources, run_config
from imgpipe_dagster_tests.support import seed_corpus

pytestmark = pytest.mark.slow

SHARD = "s000001"
URLS = 160
KILL_AFTER_FINAL = 12  # URLs final before the blow: the run is well under way
RUN_DEADLINE_S = 600
# A breaker that opens on the first few refused requests and probes every 2 s: the router is surely
# "all out" while the server restarts (medium's 75 failures may take longer than a quick restart), so
# its "resumed" line must follow.
BREAKER = {"circuit_failure_threshold": 4, "circuit_timeout_seconds": 2}


def _final(conn) -> int:
    (n,) = conn.execute("SELECT count(*) FROM corpus_urls WHERE state IN ('done', 'failed_permanent')").fetchone()
    conn.commit()
    return n


def test_a_killed_managed_server_is_restarted_by_the_run(
    dagster_instance, database_url, conn, imgpipe_home, image_server, tiny_model_dir
):
    from imgpipe_dagster.resources import GpuModelResource

    urls = [image_server.image_url(name, "jpg", width=96, n=n)
            for n, name in enumerate(["rocket", "coffee", "chelsea", "astronaut"] * (URLS // 4))]  # fmt: skip
    seed_corpus(conn, {SHARD: urls})
    dagster_instance.add_dynamic_partitions(URL_SHARDS, [SHARD])
    gpu_model = GpuModelResource(devices=["cpu"], base_port=0, model_path=str(tiny_model_dir), idle_timeout_s=300,
                                 startup_timeout_s=300)  # fmt: skip
    launcher = GpuServerLauncher(gpu_server_records_dir(imgpipe_home))
    # Warm the server the run will reuse, as a previous run would have left it (loading torch on a busy
    # 2-core machine takes longer than the run's first URLs).
    (warm,) = gpu_model.launcher(resolve("medium")[1]).ensure(["cpu"], base_port=0)

    outcome: dict = {}
    config = run_config(**BREAKER)
    # four photos repeat: with duplicate reuse most URLs would never reach the GPU tier this test kills
    config["ops"]["image_analysis"]["config"]["reuse_duplicates"] = False

    def run() -> None:
        outcome["result"] = materialize([image_analysis], instance=dagster_instance, partition_key=SHARD,
                                        resources=resources(database_url, gpu_model), run_config=config,
                                        raise_on_error=False)  # fmt: skip

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + RUN_DEADLINE_S
        while time.monotonic() < deadline and runner.is_alive() and _final(conn) < KILL_AFTER_FINAL:
            time.sleep(0.2)
        assert runner.is_alive(), "the run ended before the server could be killed"
        assert _final(conn) < URLS, "the run finished its URLs before the blow"
        (record,) = launcher.status()
        assert record["pid"] == warm.pid and record["alive"]
        os.kill(record["pid"], signal.SIGKILL)
        # what `imgpipe status` shows right after the blow (the run waits FIRST_BACKOFF_S to restart it)
        screen = render(collect(conn, include_dead=True))
        runner.join(RUN_DEADLINE_S)
        assert not runner.is_alive(), f"the run did not end within {RUN_DEADLINE_S}s"
    finally:
        if runner.is_alive():
            launcher.stop()  # lets the run fail instead of hanging the session
            runner.join(60)

    result = outcome["result"]
    assert result.success
    dead = [line for line in screen.splitlines() if warm.url.removeprefix("http://") in line]
    assert dead and "DEAD" in dead[0], screen
    assert f"process {warm.pid} is gone" in dead[0]

    report = verify(conn, [SHARD])
    assert report.complete, report.lines()
    messages = [entry.user_message for entry in dagster_instance.all_logs(result.run_id)]
    died = [m for m in messages if "died; restart 1 of" in m]
    restarted = [m for m in messages if " restarted (cpu, pid " in m]
    assert died and f"pid {warm.pid}" in died[0], messages
    assert restarted and warm.url in restarted[0]
    assert any(m.startswith("Router resumed") for m in messages), [m for m in messages if "Router" in m]
    (after,) = launcher.status()
    assert after["alive"] and after["pid"] != warm.pid
    assert (after["port"], after["settings_hash"]) == (warm.port, warm.settings_hash)
    launcher.stop()
