"""`imgpipe dev` stops everything it started (webserver, daemon, code servers) on SIGTERM and on Ctrl-C
(SIGINT), even when it was itself started with SIGINT ignored (a shell's background job)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from imgpipe_dagster.processes import stop_process_group
from imgpipe_dagster.store import database as db

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
START_DEADLINE_S = 240
STOP_DEADLINE_S = 90  # dev's own grace (30 s) + the group's stop, with room for a loaded machine
# What `dagster dev` runs: the webserver, the daemon and a code server
EXPECTED = ("dagster_webserver", "dagster._daemon", "code-server")


def _port_free_now() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ignore_sigint() -> None:
    """As a shell starts a background job: what dev starts inherits this unless dev resets it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_imgpipe_dev_stops_its_whole_tree(stop_signal, database_url, _templates, tmp_path):
    _templates["created"].append(db.database_name(db.dagster_database_url(database_url)))
    home = REPO_ROOT / ".imgpipe" / "test" / f"dev-{os.getpid()}-{stop_signal.name}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "IMGPIPE_"))} | {
        "IMGPIPE_HOME": str(home), db.DATABASE_URL_ENV: database_url,
    }  # fmt: skip
    log_path = tmp_path / "dev.log"

    with open(log_path, "wb") as log_file:
        dev = subprocess.Popen(
            [sys.executable, "-c", "import sys; from imgpipe_dagster.cli import main; sys.exit(main())",
             "dev", "--port", str(_port_free_now())],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
            start_new_session=True, preexec_fn=_ignore_sigint,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        tree: list[psutil.Process] = []
        while time.monotonic() < deadline and dev.poll() is None:
            tree = _tree(dev.pid)
            commands = [" ".join(p.cmdline()) for p in tree if _alive(p)]
            if all(any(name in c for c in commands) for name in EXPECTED):
                break
            time.sleep(1)
        assert dev.poll() is None, f"imgpipe dev exited early:\n{log_path.read_text()[-3000:]}"
        assert all(any(name in " ".join(p.cmdline()) for p in tree) for name in EXPECTED), (
            f"not all of {EXPECTED} started:\n{log_path.read_text()[-3000:]}")  # fmt: skip

        dev.send_signal(stop_signal)
        deadline = time.monotonic() + STOP_DEADLINE_S
        while time.monotonic() < deadline and (dev.poll() is None or any(_alive(p) for p in tree)):
            time.sleep(0.5)
        survivors = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in tree if _alive(p)]
        assert dev.poll() is not None, "imgpipe dev itself did not exit"
        assert not survivors, f"still running {STOP_DEADLINE_S}s after {stop_signal.name}: {survivors}"
    finally:
        leftovers = [p for p in _tree(dev.pid) + tree if _alive(p)]
        stop_process_group(dev, grace_s=5)
        for process in leftovers:
            stop_process_group(process.pid, grace_s=5)
        shutil.rmtree(home, ignore_errors=True)
