"""The launcher with real server processes: one per device, locked, reused, restarted, stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher, ServerStartError, launcher_main
from imgpipe_dagster.gpu_server.settings import ServerSettings


def free_port_pair() -> int:
    """A port p with p and p+1 both free on loopback."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def launcher(tiny_model_dir: Path, tmp_path: Path) -> Iterator[GpuServerLauncher]:
    settings = ServerSettings(model_path=str(tiny_model_dir), max_new_tokens=2)
    started = GpuServerLauncher(tmp_path / "state", settings, startup_timeout_s=120)
    try:
        yield started
    finally:
        started.stop(timeout_s=10)


def test_one_server_per_device_started_once_reused_restarted_and_stopped(launcher: GpuServerLauncher) -> None:
    base_port = free_port_pair()
    # Two callers at once (two pipeline runs): the per-port lock lets only one of them start each server.
    twin = GpuServerLauncher(launcher.state_dir, launcher.settings, startup_timeout_s=120)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(
            lambda each: each.ensure(["cpu", "cpu"], base_port=base_port), [launcher, twin]
        )
    assert [endpoint.port for endpoint in first] == [base_port, base_port + 1]
    assert [endpoint.pid for endpoint in first] == [endpoint.pid for endpoint in second]
    assert sorted([first[0].reused, second[0].reused]) == [False, True]
    for endpoint in first:
        report = httpx.get(f"{endpoint.url}/health", timeout=30).json()
        assert (
            report["status"] == "ready" and report["pid"] == endpoint.pid and report["port"] == endpoint.port
        )

    records = {entry["port"]: entry for entry in launcher.status()}
    assert set(records) == {base_port, base_port + 1}
    assert all(entry["alive"] and entry["health"]["status"] == "ready" for entry in records.values())
    assert all(Path(entry["log"]).is_file() for entry in records.values())
    assert records[base_port]["cuda_visible_devices"] == ""  # CPU servers see no GPU

    # A killed server is restarted by the next ensure(); the healthy one is reused.
    os.kill(first[1].pid, signal.SIGKILL)
    again = launcher.ensure(["cpu", "cpu"], base_port=base_port)
    assert again[0].pid == first[0].pid and again[0].reused
    assert again[1].pid != first[1].pid and not again[1].reused
    assert httpx.get(f"{again[1].url}/health", timeout=30).json()["status"] == "ready"

    assert sorted(launcher.stop()) == [base_port, base_port + 1]
    assert gone(again[0].pid) and gone(again[1].pid)
    assert launcher.status() == []


def test_a_server_that_cannot_load_its_model_is_reported_with_its_log(tmp_path: Path) -> None:
    settings = ServerSettings(model_path=str(tmp_path / "no-model-here"))
    launcher = GpuServerLauncher(tmp_path / "state", settings, startup_timeout_s=120)
    with pytest.raises(ServerStartError) as failure:
        launcher.ensure(["cpu"], base_port=free_port_pair())
    assert "no-model-here" in str(failure.value)
    assert all(not entry["alive"] for entry in launcher.status())


def test_command_line_status_and_stop_print_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    assert launcher_main(["status", "--state-dir", str(state_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert launcher_main(["stop", "--state-dir", str(state_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == {"stopped_ports": []}
