"""The GPU server watchdog's rules, on real processes and real launcher state: a server whose restarts
keep failing is given up after the bound with backoff in between, a server an operator stopped stays
stopped, and external servers are never watched."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil

from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.gpu_server.settings import settings_hash
from imgpipe_dagster.gpu_server.watchdog import ServerWatchdog
from imgpipe_dagster.resources import GpuModelResource
from imgpipe_dagster.settings_map import medium_server_settings
from imgpipe_dagster_tests.support import refused_port


def dead_server_record(state_dir, model_path: str, port: int) -> None:
    """What the launcher leaves behind when its server was SIGKILLed: the record, the settings file it
    ran and its log, with the pid of a process that has ended."""
    state_dir.mkdir(parents=True, exist_ok=True)
    settings = medium_server_settings(model_path).replace(port=port, host="127.0.0.1")
    settings_file = state_dir / "gpu-server-any-0.settings.json"
    settings_file.write_text(settings.to_json())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    create_time = psutil.Process(gone.pid).create_time()
    gone.wait()
    log = state_dir / "gpu-server-any-0.log"
    log.write_text("INFO serving\nKilled\n")
    record = {"slot": "any-0", "pid": gone.pid, "create_time": create_time, "port": port, "host": "127.0.0.1",
              "url": f"http://127.0.0.1:{port}", "device": "cpu", "model_path": model_path,
              "settings_file": str(settings_file), "settings_hash": settings_hash(settings), "log": str(log)}  # fmt: skip
    (state_dir / "gpu-server-any-0.json").write_text(json.dumps(record))


def test_restarts_that_keep_failing_back_off_and_stop_at_the_bound(tmp_path):
    state_dir = tmp_path / "gpu-servers"
    with refused_port() as port:
        pass  # a port nothing holds now: the restart binds it again
    dead_server_record(state_dir, str(tmp_path / "no-such-model"), port)
    launcher = GpuServerLauncher(state_dir, startup_timeout_s=120)
    (endpoint,) = launcher.recorded_endpoints()
    reports: list[str] = []
    watchdog = ServerWatchdog(launcher, [endpoint], reports.append, first_backoff_s=0.2, max_backoff_s=0.4,
                              max_restarts=2)  # fmt: skip
    (watched,) = watchdog.watched
    deadline = time.monotonic() + 240
    while not watched.given_up and time.monotonic() < deadline:
        watchdog.check(watched)
        time.sleep(0.05)

    assert watched.given_up, reports
    assert "died; restart 1 of 2 in 0 s" in reports[0] and "Killed" in reports[0]  # the log's last lines
    failures = [r for r in reports if "failed (" in r]
    assert len(failures) == 2 and "next try in 0 s" in failures[0]
    assert reports[-1].endswith("2 restarts failed; left dead")
    assert not watchdog.restarted
    # the restarts ran the server's own settings file: same model, same port
    (record,) = launcher.status()
    assert record["port"] == port and record["model_path"] == str(tmp_path / "no-such-model")


def test_a_server_an_operator_stopped_stays_stopped(tmp_path):
    state_dir = tmp_path / "gpu-servers"
    dead_server_record(state_dir, str(tmp_path / "model"), 1)
    launcher = GpuServerLauncher(state_dir)
    (endpoint,) = launcher.recorded_endpoints()
    assert launcher.stop() == []  # `imgpipe gpu-server stop`: nothing alive, the record goes
    reports: list[str] = []
    watchdog = ServerWatchdog(launcher, [endpoint], reports.append)
    watchdog.check(watchdog.watched[0])
    assert reports == [f"GPU server {endpoint.url}: stopped by an operator (no record); not restarted"]
    assert launcher.revive(endpoint) is None and launcher.status() == []


def test_external_servers_are_never_watched():
    external = GpuModelResource(mode="external", endpoints=["http://127.0.0.1:1"])
    with external.keep_alive() as watchdog:
        assert watchdog is None  # nothing watches, nothing starts


def test_the_settings_hash_is_that_of_the_settings_file_a_revived_server_loads():
    # A restart runs the settings file; 900 (int) in memory reads back as 900.0: same settings, same hash.
    settings = medium_server_settings("/models/m")
    assert settings_hash(settings.replace(idle_timeout_s=900)) == settings_hash(settings.replace(idle_timeout_s=900.0))
