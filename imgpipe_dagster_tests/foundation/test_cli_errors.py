"""Bad configuration gives one clear line that says what to do, never a traceback."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imgpipe(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "imgpipe_dagster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)  # fmt: skip


def assert_one_clear_line(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("imgpipe: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0]


def test_unreachable_database_url():
    result = imgpipe("db", "up", env={"IMGPIPE_DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:1/imgpipe"})
    assert_one_clear_line(result, "cannot connect to PostgreSQL", "IMGPIPE_DATABASE_URL")
    assert "hunter2" not in result.stderr + result.stdout


def test_dev_port_in_use():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = imgpipe("dev", "--port", str(port), env={"IMGPIPE_DATABASE_URL": "postgresql://x@127.0.0.1:1/x"})
    assert_one_clear_line(result, f"port {port}", "--port")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a folder to another user")
def test_embedded_data_directory_owned_by_someone_else(tmp_path):
    home = REPO / ".imgpipe" / "test" / f"foreign-{os.getpid()}"
    (home / "pg").mkdir(parents=True, exist_ok=True)
    try:
        os.chown(home / "pg", 65534, 65534)  # nobody
        env = {"IMGPIPE_HOME": str(home)}
        env_without_url = {k: v for k, v in os.environ.items() if k != "IMGPIPE_DATABASE_URL"}
        result = subprocess.run([sys.executable, "-m", "imgpipe_dagster.cli", "db", "up"], capture_output=True,
                                text=True, timeout=120, env={**env_without_url, **env}, cwd=REPO)  # fmt: skip
        assert_one_clear_line(result, "belongs to uid 65534", "IMGPIPE_HOME")
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)
