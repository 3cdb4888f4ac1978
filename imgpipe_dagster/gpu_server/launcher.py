"""Start, reuse, stop and inspect one detached GPU server process per GPU.

State lives under ``state_dir``: per port a record ``gpu-server-<port>.json`` (pid, device, model,
log path), a log ``gpu-server-<port>.log`` and a lock ``gpu-server-<port>.lock``. Every change to the
server on a port happens under that port's file lock, so two callers (two Dagster runs, a run and
the CLI) never start the same server twice. Servers are started in their own session so they
outlive the caller, and leave by themselves after ``idle_timeout_s`` when one is set.

``ensure()`` reuses a healthy server of the same model, waits for one that is still loading,
restarts a dead, failed or unresponsive one, and replaces a server running another model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from filelock import FileLock

from imgpipe_dagster.gpu_server.settings import TOKEN_ENV_VAR, ServerSettings, settings_to_args
from imgpipe_dagster.processes import stop_process_group

SERVER_MODULE = "imgpipe_dagster.gpu_server"
DEFAULT_STATE_DIR = Path(".imgpipe") / "gpu-servers"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class ServerStartError(RuntimeError):
    """A server process did not become ready; the message carries the end of its log."""


@dataclass(frozen=True)
class Endpoint:
    url: str
    port: int
    device: str
    pid: int
    # True when an already running server was reused rather than started by this call.
    reused: bool


def detect_devices() -> list[str]:
    """One entry per visible CUDA GPU ("cuda:0", "cuda:1", ...), or ["cpu"] without one."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{index}" for index in range(count)] or ["cpu"]


def _child_device(device: str) -> tuple[str, str]:
    """(device argument for the child, its CUDA_VISIBLE_DEVICES): each server sees only its GPU."""
    if device == "cpu":
        return "cpu", ""
    index = device.partition(":")[2] if device.startswith("cuda") else device
    if not index:
        index = "0"
    return "cuda:0", index


class GpuServerLauncher:
    def __init__(
        self,
        state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
        settings: ServerSettings | None = None,
        *,
        python: str = sys.executable,
        startup_timeout_s: float = 900.0,
        health_timeout_s: float = 5.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.settings = settings or ServerSettings()
        self.python = python
        self.startup_timeout_s = startup_timeout_s
        self.health_timeout_s = health_timeout_s
        self.extra_env = dict(extra_env or {})

    # ----- public API -----

    def ensure(
        self, devices: Sequence[str] | None = None, base_port: int | None = None, host: str | None = None
    ) -> list[Endpoint]:
        """A ready server per device on ports base_port, base_port+1, ... (started in parallel)."""
        devices = list(devices) if devices is not None else detect_devices()
        base_port = self.settings.port if base_port is None else base_port
        host = host or self.settings.host
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max(1, len(devices))) as pool:
            futures = [
                pool.submit(self._ensure_one, device, base_port + offset, host)
                for offset, device in enumerate(devices)
            ]
            return [future.result() for future in futures]

    def stop(self, ports: Sequence[int] | None = None, timeout_s: float = 30.0) -> list[int]:
        """Stop the recorded servers (all, or those on ``ports``); returns the ports stopped."""
        stopped = []
        for port in sorted(ports if ports is not None else self._recorded_ports()):
            with self._lock(port):
                record = self._read_record(port)
                if record is not None and self._alive(record):
                    _terminate(record["pid"], timeout_s)
                    stopped.append(port)
                self._record_path(port).unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, Any]]:
        """One entry per recorded server: record, whether its process lives, and its /health."""
        entries = []
        for port in sorted(self._recorded_ports()):
            record = self._read_record(port)
            if record is None:
                continue
            alive = self._alive(record)
            entries.append(
                {
                    **record,
                    "alive": alive,
                    "health": self._probe(record["host"], port) if alive else None,
                }
            )
        return entries

    # ----- one server -----

    def _ensure_one(self, device: str, port: int, host: str) -> Endpoint:
        with self._lock(port):
            record = self._read_record(port)
            if record is not None and self._alive(record):
                if record.get("model_path") == self.settings.model_path and record.get("device") == device:
                    health = self._await_ready(record, started_here=False)
                    if health is not None:
                        return Endpoint(_url(host, port), port, device, record["pid"], reused=True)
                _terminate(record["pid"], 30.0)
            self._record_path(port).unlink(missing_ok=True)
            return self._start(device, port, host)

    def _start(self, device: str, port: int, host: str) -> Endpoint:
        child_device, visible = _child_device(device)
        settings = self.settings.replace(device=child_device, port=port, host=host)
        env = os.environ.copy()
        env.update(self.extra_env)
        env["CUDA_VISIBLE_DEVICES"] = visible
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
        env.pop(TOKEN_ENV_VAR, None)
        if settings.bearer_token:
            env[TOKEN_ENV_VAR] = settings.bearer_token
        log_path = self.state_dir / f"gpu-server-{port}.log"
        command = [self.python, "-m", SERVER_MODULE, *settings_to_args(settings)]
        with open(log_path, "ab") as log_file:
            log_file.write(
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode()
            )
            log_file.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # outlives the caller and its Ctrl-C
            )
        record = {
            "pid": process.pid,
            "create_time": psutil.Process(process.pid).create_time(),
            "port": port,
            "host": host,
            "url": _url(host, port),
            "device": device,
            "cuda_visible_devices": visible,
            "model_path": settings.model_path,
            "log": str(log_path),
            "started_at": time.time(),
        }
        self._write_record(port, record)
        if self._await_ready(record, started_here=True) is None:
            raise AssertionError("unreachable: _await_ready raises for servers started here")
        return Endpoint(record["url"], port, device, process.pid, reused=False)

    def _await_ready(self, record: dict[str, Any], *, started_here: bool) -> dict[str, Any] | None:
        """/health of the recorded server once ready; None (reused servers) or ServerStartError if never."""
        deadline = time.monotonic() + self.startup_timeout_s
        unreachable_since: float | None = None
        while time.monotonic() < deadline:
            if not self._alive(record):
                if started_here:
                    raise ServerStartError(f"server on port {record['port']} exited:\n{_tail(record['log'])}")
                return None
            health = self._probe(record["host"], record["port"])
            if health is not None and health.get("pid") not in (None, record["pid"]):
                health = None  # another process answers on this port
            status = health.get("status") if health else None
            if status == "ready":
                return health
            if status in ("failed", "draining"):
                if started_here:
                    _terminate(record["pid"], 10.0)
                    raise ServerStartError(
                        f"server on port {record['port']} is {status}: {health.get('error') if health else ''}\n"
                        f"{_tail(record['log'])}"
                    )
                return None
            if status is None:
                unreachable_since = unreachable_since or time.monotonic()
                # A live server we did not start that answers nothing for a while is hung.
                if not started_here and time.monotonic() - unreachable_since > 3 * self.health_timeout_s:
                    return None
            else:
                unreachable_since = None
            time.sleep(0.25)
        if started_here:
            _terminate(record["pid"], 10.0)
            raise ServerStartError(
                f"server on port {record['port']} not ready after {self.startup_timeout_s:.0f}s\n{_tail(record['log'])}"
            )
        return None

    # ----- helpers -----

    def _probe(self, host: str, port: int) -> dict[str, Any] | None:
        try:
            response = httpx.get(f"{_url(host, port)}/health", timeout=self.health_timeout_s)
            return response.json()
        except (httpx.HTTPError, ValueError):
            return None

    @staticmethod
    def _alive(record: dict[str, Any]) -> bool:
        pid = record.get("pid")
        if not isinstance(pid, int):
            return False
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            # Guard against pid reuse: same start time as recorded.
            return abs(process.create_time() - float(record.get("create_time", 0))) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def _lock(self, port: int) -> FileLock:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.state_dir / f"gpu-server-{port}.lock"), timeout=self.startup_timeout_s + 60)

    def _record_path(self, port: int) -> Path:
        return self.state_dir / f"gpu-server-{port}.json"

    def _read_record(self, port: int) -> dict[str, Any] | None:
        try:
            return json.loads(self._record_path(port).read_text())
        except (OSError, ValueError):
            return None

    def _write_record(self, port: int, record: dict[str, Any]) -> None:
        path = self._record_path(port)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(record, indent=2))
        temporary.replace(path)

    def _recorded_ports(self) -> list[int]:
        ports = []
        for path in self.state_dir.glob("gpu-server-*.json"):
            suffix = path.stem.rpartition("-")[2]
            if suffix.isdigit():
                ports.append(int(suffix))
        return ports


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM (graceful: uvicorn finishes in-flight requests), then SIGKILL after ``timeout_s``."""
    stop_process_group(pid, timeout_s)


def _tail(path: str, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----- command line: `imgpipe gpu-server start|stop|status` is wired to launcher_main -----


def launcher_main(argv: Sequence[str] | None = None) -> int:
    """`start|stop|status` for the servers under --state-dir; prints JSON. Returns the exit code."""
    from imgpipe_dagster.gpu_server.settings import build_arg_parser, settings_from_args

    parser = argparse.ArgumentParser(
        prog="imgpipe gpu-server", description="Manage the per-GPU inference servers."
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument(
        "--state-dir", default=os.environ.get("IMGPIPE_GPU_STATE_DIR", str(DEFAULT_STATE_DIR))
    )
    parser.add_argument(
        "--devices", default=None, help="comma-separated devices (cuda:0,cuda:1 or cpu); default: every GPU"
    )
    parser.add_argument("--base-port", type=int, default=8000)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    options, server_args = parser.parse_known_args(argv)
    if options.action == "start":
        if "--model" not in server_args:
            parser.error(
                "start needs --model PATH (and any server option, see python -m imgpipe_dagster.gpu_server -h)"
            )
        settings = settings_from_args(list(server_args))
    else:
        if server_args:
            build_arg_parser().error(f"unexpected arguments for {options.action}: {' '.join(server_args)}")
        settings = ServerSettings()
    launcher = GpuServerLauncher(options.state_dir, settings, startup_timeout_s=options.startup_timeout)
    if options.action == "start":
        devices = options.devices.split(",") if options.devices else None
        try:
            endpoints = launcher.ensure(devices, base_port=options.base_port)
        except ServerStartError as error:
            print(str(error), file=sys.stderr)
            return 1
        print(json.dumps([endpoint.__dict__ for endpoint in endpoints], indent=2))
    elif options.action == "stop":
        print(json.dumps({"stopped_ports": launcher.stop()}))
    else:
        print(json.dumps(launcher.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(launcher_main())
