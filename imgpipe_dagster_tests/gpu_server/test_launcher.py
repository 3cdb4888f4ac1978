"""The launcher with real server processes: one per device, locked, reused, restarted, stopped."""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher, ServerStartError, launcher_main
from imgpipe_dagster.gpu_server.settings import ServerSettings
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.settings_map import medium_server_settings

TOKEN = "launcher-test-token"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def launcher(tiny_model_dir: Path, tmp_path: Path) -> Iterator[GpuServerLauncher]:
    settings = medium_server_settings(str(tiny_model_dir), max_new_tokens=2, bearer_token=TOKEN)
    started = GpuServerLauncher(tmp_path / "state", settings, startup_timeout_s=120)
    try:
        yield started
    finally:
        started.stop(timeout_s=10)


def test_one_server_per_device_started_once_reused_restarted_and_stopped(launcher: GpuServerLauncher) -> None:
    # Base port 0: each server binds a free port and reports it. Two callers at once (two pipeline
    # runs): the per-slot lock lets only one of them start each server.
    twin = GpuServerLauncher(launcher.state_dir, launcher.settings, startup_timeout_s=120)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda each: each.ensure(["cpu", "cpu"], base_port=0), [launcher, twin])
    ports = [endpoint.port for endpoint in first]
    assert all(ports) and len(set(ports)) == 2
    assert [endpoint.pid for endpoint in first] == [endpoint.pid for endpoint in second]
    assert sorted([first[0].action, second[0].action]) == ["reused", "started"]
    for endpoint in first:
        report = httpx.get(f"{endpoint.url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
        assert (
            report["status"] == "ready" and report["pid"] == endpoint.pid and report["port"] == endpoint.port
        )
        assert report["settings_hash"] == endpoint.settings_hash

    records = {entry["port"]: entry for entry in launcher.status()}
    assert set(records) == set(ports)
    assert all(entry["settings_hash"] == first[0].settings_hash for entry in records.values())
    assert all(entry["alive"] and entry["health"]["status"] == "ready" for entry in records.values())
    assert all(Path(entry["log"]).is_file() for entry in records.values())
    assert records[ports[0]]["cuda_visible_devices"] == ""  # CPU servers see no GPU

    # The settings travel in a file only the owner may read; the token never shows on a command line.
    for entry in records.values():
        assert stat.S_IMODE(Path(entry["settings_file"]).stat().st_mode) == 0o600
        command_line = " ".join(psutil.Process(entry["pid"]).cmdline())
        assert TOKEN not in command_line and entry["settings_file"] in command_line
        assert TOKEN not in json.dumps(entry)

    # A killed server is restarted by the next ensure(); the healthy one is reused.
    os.kill(first[1].pid, signal.SIGKILL)
    again = launcher.ensure(["cpu", "cpu"], base_port=0)
    assert again[0].pid == first[0].pid and again[0].reused
    assert again[1].pid != first[1].pid and not again[1].reused
    assert httpx.get(f"{again[1].url}/health", timeout=30).json()["status"] == "ready"

    assert again[1].action == "restarted"
    assert sorted(launcher.stop()) == sorted([again[0].port, again[1].port])
    assert gone(again[0].pid) and gone(again[1].pid)
    assert launcher.status() == []


def test_a_server_that_cannot_load_its_model_is_reported_with_its_log(tmp_path: Path) -> None:
    settings = medium_server_settings(str(tmp_path / "no-model-here"))
    launcher = GpuServerLauncher(tmp_path / "state", settings, startup_timeout_s=120)
    with pytest.raises(ServerStartError) as failure:
        launcher.ensure(["cpu"], base_port=0)
    assert "no-model-here" in str(failure.value) and "\n" not in str(failure.value)
    assert all(not entry["alive"] for entry in launcher.status())


def test_a_model_that_fails_to_load_is_reported_in_one_line_that_names_the_log(tmp_path: Path) -> None:
    folder = tmp_path / "half-a-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # looks like a model folder; the server finds out it is not
    launcher = GpuServerLauncher(tmp_path / "state", medium_server_settings(str(folder)), startup_timeout_s=120)
    with pytest.raises(ServerStartError) as failure:
        launcher.ensure(["cpu"], base_port=0)
    message = str(failure.value)
    # the launcher may see the failed status or, when the server has already left, its last own line
    assert "\n" not in message and ("is failed: " in message or "model failed to load: " in message), message
    assert "server log: " in message
    assert "Traceback" in failure.value.log_tail  # the detail stays available, out of the message


def test_command_line_status_and_stop_print_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    assert launcher_main(["status", "--state-dir", str(state_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert launcher_main(["stop", "--state-dir", str(state_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == {"stopped_ports": []}


def test_records_live_under_imgpipe_home_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert GpuServerLauncher().state_dir == gpu_server_records_dir() == tmp_path / "home" / "gpu-servers"
    # a child process's state folder, named explicitly, gets the same layout
    assert gpu_server_records_dir(tmp_path / "child") == tmp_path / "child" / "gpu-servers"


def test_a_settings_file_is_validated_before_anything_starts(tmp_path: Path) -> None:
    settings_file = tmp_path / "settings.json"
    document = json.loads(medium_server_settings("model").to_json())
    document["max_batch_images"] = "many"
    settings_file.write_text(json.dumps(document))
    from imgpipe_dagster.gpu_server.__main__ import main

    assert main(["--settings-file", str(settings_file)]) == 2
    with pytest.raises(ValueError, match="settings.max_batch_images: expected int"):
        ServerSettings.from_json(settings_file.read_text())
    del document["max_batch_images"]
    with pytest.raises(ValueError, match="settings.max_batch_images: missing"):
        ServerSettings.from_dict(document)
    with pytest.raises(ValueError, match="unknown field"):
        ServerSettings.from_dict({**document, "max_batch_images": 2, "engine_options": {}})


def test_command_line_start_takes_a_profile_and_field_flags(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = str(tmp_path / "state")
    argv = ["start", "--state-dir", state_dir, "--model", str(tiny_model_dir), "--devices", "cpu",
            "--base-port", "0", "--profile", "conservative", "--max-new-tokens", "2",
            "--max-batch-images", "64", "--startup-timeout", "120"]  # fmt: skip
    try:
        assert launcher_main(argv, bearer_token=TOKEN) == 0  # the CLI passes $IMGPIPE_GPU_TOKEN
        (endpoint,) = json.loads(capsys.readouterr().out)
        settings = httpx.get(f"{endpoint['url']}/health", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=30).json()["settings"]  # fmt: skip
        assert settings["max_inference_queue_size"] == 500  # conservative
        assert settings["max_batch_images"] == 64 and settings["model"]["max_new_tokens"] == 2
        assert TOKEN not in " ".join(psutil.Process(endpoint["pid"]).cmdline())
    finally:
        assert launcher_main(["stop", "--state-dir", state_dir]) == 0
