"""GPU servers register in the project database and beat; readers take the live set from there
(real server processes with the tiny model, real PostgreSQL, `imgpipe status` as a command)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from imgpipe_dagster.gpu_server.discovery import discover_endpoints
from imgpipe_dagster.gpu_server.launcher import Endpoint, GpuServerLauncher
from imgpipe_dagster.gpu_server.registration import advertised_url
from imgpipe_dagster.gpu_server.settings import settings_hash
from imgpipe_dagster.resources import GpuModelResource
from imgpipe_dagster.sensors.throttle import gpu_health
from imgpipe_dagster.settings_map import medium_server_settings
from imgpipe_dagster.store import gpu_registry

BEAT_S = 0.3
IMGPIPE = [sys.executable, "-c", "import sys; from imgpipe_dagster.cli import main; sys.exit(main())"]


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 60.0) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def registered(tiny_model_dir: Path, tmp_path: Path, database_url: str):
    """A server started outside any run (its own records folder, as on another machine) that registers
    in this test's database; stopped afterwards."""
    settings = medium_server_settings(str(tiny_model_dir), max_new_tokens=4).replace(
        registry_url=database_url, registry_heartbeat_s=BEAT_S
    )
    launcher = GpuServerLauncher(tmp_path / "elsewhere", settings, startup_timeout_s=300)
    endpoint = launcher.ensure(["cpu"], base_port=0)[0]
    try:
        yield endpoint, settings
    finally:
        launcher.stop(timeout_s=10)


def row_of(conn, url: str, window_s: float = gpu_registry.LIVE_WINDOW_S):
    conn.commit()  # now() is per transaction: read each time in a new one
    return next((s for s in gpu_registry.live_servers(conn, window_s) if s.url == url), None)


def test_a_server_registers_with_its_facts_and_beats(registered, conn, tiny_model_dir) -> None:
    endpoint, settings = registered
    first = wait_for("the ready row", lambda: (r := row_of(conn, endpoint.url)) and r.status == "ready" and r)

    assert first.model == tiny_model_dir.name and first.model_path == str(tiny_model_dir)
    assert first.settings_hash == settings_hash(settings) == endpoint.settings_hash
    assert first.device == "cpu" and first.pid == endpoint.pid and first.api == "native+openai"
    assert first.max_batch_images == settings.max_batch_images
    assert first.max_inference_batch_size == settings.max_inference_batch_size
    assert first.queue_capacity == settings.max_inference_queue_size
    assert first.last_seen >= first.started_at
    later = wait_for("a newer beat", lambda: (r := row_of(conn, endpoint.url)) and r.last_seen > first.last_seen and r)
    assert later.started_at == first.started_at

    # a live settings change reaches the row with the next beat
    changed = settings.replace_model(max_new_tokens=3)
    response = httpx.post(f"{endpoint.url}/v1/settings", content=changed.to_json(include_token=False), timeout=30)
    assert response.status_code == 200, response.text
    wait_for("the new settings hash", lambda: (r := row_of(conn, endpoint.url)) and r.settings_hash == settings_hash(changed))


def test_imgpipe_status_and_the_throttle_show_a_registered_server(registered, database_url, imgpipe_home) -> None:
    endpoint, _ = registered
    wait_for("the row", lambda: endpoint.url in discover_endpoints(managed=False, registry_url=database_url))
    probed = gpu_health(GpuModelResource(mode="external", endpoints=[]), 5.0, database_url)
    assert [(gpu.url, gpu.reachable) for gpu in probed] == [(endpoint.url, True)]

    env = {**os.environ, "IMGPIPE_DATABASE_URL": database_url, "IMGPIPE_HOME": str(imgpipe_home)}
    env.pop("IMGPIPE_GPU_ENDPOINTS", None)
    result = subprocess.run([*IMGPIPE, "status", "--json"], env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    servers = {server["url"]: server for server in json.loads(result.stdout)["gpu_servers"]}
    assert endpoint.url in servers, servers
    assert servers[endpoint.url]["reachable"] and servers[endpoint.url]["status"] == "ready"


def test_a_killed_server_leaves_the_live_set_after_the_window(registered, conn, database_url) -> None:
    endpoint, _ = registered
    window_s = 4 * BEAT_S
    wait_for("the row", lambda: row_of(conn, endpoint.url, window_s))
    assert endpoint.url in discover_endpoints(managed=False, registry_url=database_url, window_s=window_s)

    server = psutil.Process(endpoint.pid)
    os.kill(endpoint.pid, signal.SIGKILL)
    server.wait(30)

    wait_for("the killed server to leave the live set", lambda: row_of(conn, endpoint.url, window_s) is None, 30)
    # it left by ageing: nobody deleted its row, which is only old now
    assert row_of(conn, endpoint.url, 3600.0) is not None
    assert endpoint.url not in discover_endpoints(managed=False, registry_url=database_url, window_s=window_s)


def test_a_clean_stop_removes_the_row_at_once(tiny_model_dir, tmp_path, database_url, conn) -> None:
    settings = medium_server_settings(str(tiny_model_dir), max_new_tokens=4).replace(
        registry_url=database_url, registry_heartbeat_s=BEAT_S
    )
    launcher = GpuServerLauncher(tmp_path / "clean", settings, startup_timeout_s=300)
    endpoint: Endpoint = launcher.ensure(["cpu"], base_port=0)[0]
    try:
        wait_for("the row", lambda: row_of(conn, endpoint.url))
    finally:
        launcher.stop(timeout_s=10)
    assert row_of(conn, endpoint.url, 3600.0) is None


def test_an_unreachable_registry_leaves_discovery_with_the_listed_servers() -> None:
    listed = ["http://gpu-a:8000", "http://gpu-b:8000/"]
    found = discover_endpoints(listed, managed=False, registry_url="postgresql://127.0.0.1:1/none")
    assert found == ["http://gpu-a:8000", "http://gpu-b:8000"]


def test_the_registry_url_stays_out_of_what_the_server_reveals(tiny_model_dir) -> None:
    secret = "postgresql://imgpipe:hunter2@db:5432/imgpipe"
    settings = medium_server_settings(str(tiny_model_dir)).replace(registry_url=secret)
    assert "hunter2" not in json.dumps(settings.to_dict(include_token=False))
    # where a server announces itself is placement, not behaviour: the same hash either way
    assert settings_hash(settings) == settings_hash(settings.replace(registry_url=None))


def test_the_registered_url_is_one_other_machines_can_reach(tiny_model_dir) -> None:
    settings = medium_server_settings(str(tiny_model_dir)).replace(port=8001)
    assert advertised_url(settings.replace(host="127.0.0.1")) == "http://127.0.0.1:8001"
    assert advertised_url(settings.replace(host="0.0.0.0")) == f"http://{socket.gethostname()}:8001"
    assert advertised_url(settings.replace(host="0.0.0.0", advertise_host="gpu-3.internal")) == "http://gpu-3.internal:8001"
    assert advertised_url(settings.replace(host="::1")) == "http://[::1]:8001"
