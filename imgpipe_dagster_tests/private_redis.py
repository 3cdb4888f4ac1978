"""A private redis-server for a test or a bench: a unix socket in a short folder of its own (a socket path
must stay under 108 bytes), no TCP port (so it never meets the machine's Redis on 6379), no persistence.
Stopped, with its folder removed, on exit."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from imgpipe_dagster.processes import stop_process_group

START_DEADLINE_S = 30


class RedisMissing(RuntimeError):
    """redis-server is not installed."""


class PrivateRedis:
    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="imgpipe-redis-", dir="/tmp"))
        self.socket = self.folder / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The broker (and result backend) URL for Celery."""
        return f"redis+socket://{self.socket}"

    def __enter__(self) -> PrivateRedis:
        server = shutil.which("redis-server")
        if server is None:
            raise RedisMissing("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [server, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_DEADLINE_S
        while not self.socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not create {self.socket} within {START_DEADLINE_S} s")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process is not None:
            stop_process_group(self.process, grace_s=10)
        shutil.rmtree(self.folder, ignore_errors=True)
