"""Start, reuse, reconfigure, restart, stop and inspect one detached GPU server process per GPU.

State lives under ``state_dir`` (by default ``$IMGPIPE_HOME/gpu-servers``): per server slot a record
``gpu-server-<slot>.json`` (pid, device, port, model, settings hash, log path), the settings file
``gpu-server-<slot>.settings.json`` (the ServerSettings JSON the server loads; 0600, it may carry the
bearer token), a log ``gpu-server-<slot>.log`` and a lock ``gpu-server-<slot>.lock``. The slot is the
port (``8000``) or, for servers that bind any free port (base port 0), ``any-<index>``; the record
holds the port the server got. Every change to a slot happens under its file lock, so two callers
(two Dagster runs, a run and the CLI) never start the same server twice. Servers are started in their
own session so they outlive the caller, and leave by themselves after ``idle_timeout_s`` when set.

``ensure()`` reuses a healthy server that runs the wanted settings (same settings hash, read from its
``/health``); takes over changed live fields (batching, queue sizes, max_new_tokens) through
``POST /v1/settings``; restarts it once idle when other fields differ (model, device, dtype flags);
waits for one that is still loading, and restarts a dead, failed or unresponsive one. Each endpoint
says what was done (``action``) and the launcher logs it on ``imgpipe.gpu_server.launcher``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil
from filelock import FileLock

from imgpipe_dagster.gpu_server.health import HealthUnavailable, ServerHealth, fetch_health
from imgpipe_dagster.gpu_server.settings import (
    ServerSettings,
    SettingsError,
    differences,
    model_path_problem,
    needs_restart,
    settings_hash,
)
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.processes import stop_process_group

SERVER_MODULE = "imgpipe_dagster.gpu_server"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("imgpipe.gpu_server.launcher")

Action = Literal["started", "reused", "reconfigured", "restarted", "busy-kept"]


class ServerStartError(RuntimeError):
    """A server process did not become ready. The message is one line (why, and where its log is);
    ``log_tail`` holds the end of the log for whoever wants the detail."""

    def __init__(self, summary: str, log_path: str | None = None) -> None:
        self.log_tail = _tail(log_path) if log_path else ""
        super().__init__(f"{summary} (server log: {log_path})" if log_path else summary)


def _why_it_exited(log_path: str) -> str:
    """The server's own one-line error (``gpu_server: …``) from its log, else its last line."""
    lines = [line.strip() for line in _tail(log_path).splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("gpu_server: ")]
    return (own or lines or ["no output"])[-1]


@dataclass(frozen=True)
class Endpoint:
    url: str
    port: int
    device: str
    pid: int
    # What ensure() did: started (none was running), reused (same settings), reconfigured (live
    # fields taken over), restarted (other settings, or a dead server), busy-kept (other settings,
    # but still busy with another run after restart_wait_s: kept as it is, and logged).
    action: Action
    # settings_hash of what the server runs now (gpu_server.settings; token and placement excluded)
    settings_hash: str
    # Settings fields that differed from the running server's (``model.`` prefix for the model part).
    changed: tuple[str, ...] = ()
    # the launcher's slot (state file names): revive() restarts the server of this slot
    slot: str = ""

    @property
    def reused(self) -> bool:
        """True when an already running server answered rather than one this call started."""
        return self.action in ("reused", "reconfigured", "busy-kept")

    def describe(self) -> str:
        text = f"GPU server {self.url} ({self.device}, pid {self.pid}, settings {self.settings_hash}): {self.action}"
        return text + (f" ({', '.join(self.changed)})" if self.changed else "")


def detect_devices() -> list[str]:
    """One entry per visible CUDA GPU ("cuda:0", "cuda:1", ...), or ["cpu"] without one.

    torch counts them in a child process: the caller (a Dagster step) only starts the servers and
    would otherwise carry torch's ~200 MB for the whole run."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
        count = int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        count = 0
    return [f"cuda:{index}" for index in range(count)] or ["cpu"]


def _child_device(device: str) -> tuple[str, str]:
    """(device argument for the child, its CUDA_VISIBLE_DEVICES): each server sees only its GPU."""
    if device == "cpu":
        return "cpu", ""
    index = device.partition(":")[2] if device.startswith("cuda") else device
    if not index:
        index = "0"
    return "cuda:0", index


def _slot(base_port: int, offset: int) -> str:
    return f"any-{offset}" if base_port == 0 else str(base_port + offset)


class GpuServerLauncher:
    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        settings: ServerSettings | None = None,
        *,
        python: str = sys.executable,
        startup_timeout_s: float = 900.0,
        health_timeout_s: float = 5.0,
        restart_wait_s: float = 300.0,
        extra_env: dict[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        """``settings`` is what ensure() starts servers with (stop and status need none);
        ``restart_wait_s`` bounds the wait for a busy server to become idle before a restart;
        ``token`` reads the whole /health of guarded servers (default: the settings' bearer token)."""
        self.state_dir = Path(state_dir) if state_dir is not None else gpu_server_records_dir()
        self.settings = settings
        self.python = python
        self.startup_timeout_s = startup_timeout_s
        self.health_timeout_s = health_timeout_s
        self.restart_wait_s = restart_wait_s
        self.extra_env = dict(extra_env or {})
        self.token = token if token is not None else (settings.bearer_token if settings else None)

    # ----- public API -----

    def ensure(
        self, devices: Sequence[str] | None = None, base_port: int | None = None, host: str | None = None
    ) -> list[Endpoint]:
        """A ready server per device on ports base_port, base_port+1, ... (any free ports when
        base_port is 0), started in parallel, each running ``self.settings``."""
        if self.settings is None:
            raise ValueError("GpuServerLauncher.ensure needs the settings to run servers with")
        # Refused here, before any process: the reason is one line, not a server's log.
        problem = model_path_problem(self.settings.model.model_path) or self.settings.replace(
            host=host or self.settings.host).exposure_problem()
        if problem:
            raise ServerStartError(problem)
        devices = list(devices) if devices is not None else detect_devices()
        base_port = self.settings.port if base_port is None else base_port
        host = host or self.settings.host
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max(1, len(devices))) as pool:
            slots = [_slot(base_port, offset) for offset in range(len(devices))]
            futures = [
                pool.submit(self._ensure_one, device, slot, base_port + offset if base_port else 0, host)
                for offset, (device, slot) in enumerate(zip(devices, slots, strict=True))
            ]
            endpoints = [dataclasses.replace(future.result(), slot=slot) for future, slot in zip(futures, slots, strict=True)]
        for endpoint in endpoints:
            log.info(endpoint.describe())
        return endpoints

    def stop(self, ports: Sequence[int] | None = None, timeout_s: float = 30.0) -> list[int]:
        """Stop the recorded servers (all, or those on ``ports``); returns the ports stopped."""
        stopped = []
        for slot in self._recorded_slots():
            with self._lock(slot):
                record = self._read_record(slot)
                if record is None or (ports is not None and record.get("port") not in ports):
                    continue
                if self._alive(record):
                    _terminate(record["pid"], timeout_s)
                    stopped.append(int(record["port"]))
                self._forget(slot)
        return sorted(stopped)

    def revive(self, endpoint: Endpoint) -> Endpoint | None:
        """Start the server of ``endpoint``'s slot again when its record is there but its process is
        gone (killed, crashed): the same settings file it ran (same settings hash), on the same port,
        so the runs' routers find it at the same URL. None when it runs (another caller restarted it
        first) or when its record is gone (``imgpipe gpu-server stop``: a person stopped it, so it
        stays stopped). Raises ServerStartError when the new process does not get ready."""
        if not endpoint.slot:
            raise ValueError("revive needs an endpoint from ensure() (with its slot)")
        with self._lock(endpoint.slot):
            record = self._read_record(endpoint.slot)
            if record is None or self._alive(record):
                return None
            try:
                wanted = ServerSettings.from_json(Path(record["settings_file"]).read_text())
            except (KeyError, OSError, SettingsError) as exc:
                if self.settings is None:
                    raise ServerStartError(f"server in slot {endpoint.slot}: its settings are gone ({exc})") from exc
                wanted = self._wanted(endpoint.device, endpoint.port, record.get("host") or self.settings.host)
            wanted = wanted.replace(port=int(record.get("port") or endpoint.port))
            self._forget(endpoint.slot)
            started = self._start(endpoint.device, endpoint.slot, wanted, "restarted", ())
        return dataclasses.replace(started, slot=endpoint.slot)

    def recorded_endpoints(self) -> list[Endpoint]:
        """An endpoint per recorded server with a port, alive or not (what a watchdog can revive)."""
        endpoints = []
        for slot in self._recorded_slots():
            record = self._read_record(slot)
            if record is not None and record.get("port"):
                endpoints.append(Endpoint(record["url"], int(record["port"]), record["device"], int(record["pid"]),
                                          "reused", record.get("settings_hash") or "", slot=slot))  # fmt: skip
        return endpoints

    def record_of(self, slot: str) -> tuple[dict[str, Any] | None, bool]:
        """(the slot's record or None, whether its process lives)."""
        record = self._read_record(slot)
        return record, record is not None and self._alive(record)

    def live_records(self) -> list[dict[str, Any]]:
        """The records of the servers whose process lives (no /health probe)."""
        records = (self._read_record(slot) for slot in self._recorded_slots())
        return [record for record in records if record is not None and self._alive(record)]

    def status(self) -> list[dict[str, Any]]:
        """One entry per recorded server: record, whether its process lives, and its /health."""
        entries = []
        for slot in self._recorded_slots():
            record = self._read_record(slot)
            if record is None:
                continue
            alive = self._alive(record)
            health = self._probe(record["host"], record["port"]) if alive and record.get("port") else None
            entries.append({**record, "alive": alive, "health": health.to_json() if health else None})
        return sorted(entries, key=lambda entry: entry.get("port") or 0)

    # ----- one server -----

    def _wanted(self, device: str, port: int, host: str) -> ServerSettings:
        assert self.settings is not None
        return self.settings.replace(port=port, host=host).replace_model(device=_child_device(device)[0])

    def _ensure_one(self, device: str, slot: str, port: int, host: str) -> Endpoint:
        wanted = self._wanted(device, port, host)
        with self._lock(slot):
            record = self._read_record(slot)
            changed: tuple[str, ...] = ()
            if record is not None and self._alive(record):
                if record.get("device") == device:
                    health = self._await_ready(record, started_here=False)
                    if health is not None:
                        endpoint, changed = self._match(slot, record, health, wanted)
                        if endpoint is not None:
                            return endpoint
                _terminate(record["pid"], 30.0)
                action: Action = "restarted"
            else:
                action = "restarted" if record is not None else "started"
                # Nothing of ours held the port: if it is taken, another program has it, and the
                # server would only wait for it and die. (A restarted server's port may still be held
                # for a moment by its predecessor: the server itself waits for that one.)
                if port and action == "started" and _port_taken(host, port):
                    raise ServerStartError(f"port {port} on {host} is in use by another program: stop it or "
                                           f"choose another --base-port")  # fmt: skip
            self._forget(slot)
            return self._start(device, slot, wanted, action, changed)

    def _match(
        self, slot: str, record: dict[str, Any], health: ServerHealth, wanted: ServerSettings
    ) -> tuple[Endpoint | None, tuple[str, ...]]:
        """The endpoint when the running server can serve ``wanted`` (as is or reconfigured live);
        (None, changed fields) when it must be restarted, which the caller does."""
        url = _url(record["host"], record["port"])
        try:
            running = ServerSettings.from_dict(health.settings)
        except SettingsError:
            return None, ("settings not reported",)  # a server of an older version
        if health.settings_hash == settings_hash(wanted):
            return Endpoint(url, record["port"], record["device"], record["pid"], "reused", health.settings_hash), ()
        changed = tuple(differences(running, wanted))
        if not needs_restart(list(changed)):
            updated = self._reconfigure(url, wanted)
            if updated is not None and updated.settings_hash == settings_hash(wanted):
                self._write_record(slot, {**record, "settings_hash": updated.settings_hash})
                endpoint = Endpoint(url, record["port"], record["device"], record["pid"], "reconfigured",
                                    updated.settings_hash, changed)  # fmt: skip
                return endpoint, changed
            return None, changed
        if self._await_idle(record):
            return None, changed
        log.warning("GPU server %s runs other settings (%s) and is still busy after %.0f s: kept as it is",
                    url, ", ".join(changed), self.restart_wait_s)  # fmt: skip
        endpoint = Endpoint(url, record["port"], record["device"], record["pid"], "busy-kept",
                            health.settings_hash or "", changed)  # fmt: skip
        return endpoint, changed

    def _reconfigure(self, url: str, wanted: ServerSettings) -> ServerHealth | None:
        headers = {"Content-Type": "application/json"}
        if wanted.bearer_token:
            headers["Authorization"] = f"Bearer {wanted.bearer_token}"
        try:
            response = httpx.post(f"{url}/v1/settings", content=wanted.to_json(include_token=False),
                                  headers=headers, timeout=self.health_timeout_s)  # fmt: skip
        except httpx.HTTPError as error:
            log.warning("GPU server %s: settings update failed (%s); restarting it", url, error)
            return None
        if response.status_code != 200:
            log.warning("GPU server %s refused the settings update (HTTP %s: %s); restarting it",
                        url, response.status_code, response.text[:200])  # fmt: skip
            return None
        return ServerHealth.from_json(response.json())

    def _await_idle(self, record: dict[str, Any]) -> bool:
        """Whether the server has nothing queued, in flight or being answered within restart_wait_s."""
        deadline = time.monotonic() + self.restart_wait_s
        while True:
            health = self._probe(record["host"], record["port"])
            if health is None or (not health.active_requests and not health.queue_size and not health.in_flight):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def _start(
        self, device: str, slot: str, settings: ServerSettings, action: Action, changed: tuple[str, ...]
    ) -> Endpoint:
        _, visible = _child_device(device)
        env = os.environ.copy()
        env.update(self.extra_env)
        env["CUDA_VISIBLE_DEVICES"] = visible
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
        settings_file = self.state_dir / f"gpu-server-{slot}.settings.json"
        _write_private(settings_file, settings.to_json())
        port_file = self.state_dir / f"gpu-server-{slot}.port"
        port_file.unlink(missing_ok=True)
        log_path = self.state_dir / f"gpu-server-{slot}.log"
        command = [self.python, "-m", SERVER_MODULE, "--settings-file", str(settings_file),
                   "--port-file", str(port_file)]  # fmt: skip
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
            "slot": slot,
            "pid": process.pid,
            "create_time": psutil.Process(process.pid).create_time(),
            "port": settings.port,
            "host": settings.host,
            "url": _url(settings.host, settings.port),
            "device": device,
            "cuda_visible_devices": visible,
            "model_path": settings.model.model_path,
            "settings_file": str(settings_file),
            "settings_hash": settings_hash(settings),
            "log": str(log_path),
            "started_at": time.time(),
        }
        self._write_record(slot, record)
        port = self._await_port(record, port_file)
        record.update(port=port, url=_url(settings.host, port))
        self._write_record(slot, record)
        self._await_ready(record, started_here=True)
        return Endpoint(record["url"], port, device, process.pid, action, record["settings_hash"], changed)

    def _await_port(self, record: dict[str, Any], port_file: Path) -> int:
        """The port the new server bound (it writes it before loading the model)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(port_file.read_text())
            if not self._alive(record):
                raise ServerStartError(f"server in slot {record['slot']} exited: {_why_it_exited(record['log'])}",
                                       record["log"])  # fmt: skip
            time.sleep(0.1)
        _terminate(record["pid"], 10.0)
        raise ServerStartError(f"server in slot {record['slot']} bound no port in {self.startup_timeout_s:.0f}s",
                               record["log"])  # fmt: skip

    def _await_ready(self, record: dict[str, Any], *, started_here: bool) -> ServerHealth | None:
        """/health of the recorded server once ready; None (reused servers) or ServerStartError if never."""
        deadline = time.monotonic() + self.startup_timeout_s
        unreachable_since: float | None = None
        while time.monotonic() < deadline:
            if not self._alive(record):
                if started_here:
                    raise ServerStartError(f"server on port {record['port']} exited: {_why_it_exited(record['log'])}",
                                           record["log"])  # fmt: skip
                return None
            health = self._probe(record["host"], record["port"])
            if health is not None and health.pid not in (None, record["pid"]):
                health = None  # another process answers on this port
            status = health.status if health else None
            if health is not None and status == "ready":
                return health
            if health is not None and status in ("failed", "draining"):
                if started_here:
                    _terminate(record["pid"], 10.0)
                    cause = (health.error or "no reason given").splitlines()[0]
                    raise ServerStartError(f"server on port {record['port']} is {status}: {cause}", record["log"])
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
                f"server on port {record['port']} not ready after {self.startup_timeout_s:.0f}s", record["log"]
            )
        return None

    # ----- helpers -----

    def _probe(self, host: str, port: int) -> ServerHealth | None:
        try:
            return fetch_health(_url(host, port), self.health_timeout_s, token=self.token)
        except HealthUnavailable:
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

    def _lock(self, slot: str) -> FileLock:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.state_dir / f"gpu-server-{slot}.lock"), timeout=self.startup_timeout_s + 60)

    def _record_path(self, slot: str) -> Path:
        return self.state_dir / f"gpu-server-{slot}.json"

    def _read_record(self, slot: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._record_path(slot).read_text())
        except (OSError, ValueError):
            return None

    def _write_record(self, slot: str, record: dict[str, Any]) -> None:
        path = self._record_path(slot)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(record, indent=2))
        temporary.replace(path)

    def _forget(self, slot: str) -> None:
        self._record_path(slot).unlink(missing_ok=True)
        (self.state_dir / f"gpu-server-{slot}.settings.json").unlink(missing_ok=True)
        (self.state_dir / f"gpu-server-{slot}.port").unlink(missing_ok=True)

    def _recorded_slots(self) -> list[str]:
        slots = []
        for path in self.state_dir.glob("gpu-server-*.json"):
            slot = path.name.removeprefix("gpu-server-").removesuffix(".json")
            if not slot.endswith(".settings"):
                slots.append(slot)
        return sorted(slots)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only (the settings may carry the bearer token)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    temporary.replace(path)


def _port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM (graceful: uvicorn finishes in-flight requests), then SIGKILL after ``timeout_s``."""
    stop_process_group(pid, timeout_s)


def tail_of_log(path: str, lines: int = 40) -> str:
    """The last ``lines`` lines of a server log, or "(no log)"."""
    return _tail(path, lines)


def _tail(path: str, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----- command line: `imgpipe gpu-server start|stop|status` is wired to launcher_main -----


def _server_options(parser: argparse.ArgumentParser) -> None:
    """Flags for every ServerSettings field a person may set by hand, named after the field."""
    from imgpipe_dagster.gpu_server.settings import ModelSettings
    from imgpipe_dagster.profiles import PROFILE_NAMES, GpuServerProfile

    parser.add_argument("--model", dest="model_path", help="local model directory (start: required)")
    parser.add_argument("--profile", choices=PROFILE_NAMES, default="medium",
                        help="profile whose gpu_server values the servers start with (profiles/<name>.yaml)")
    # The token comes from IMGPIPE_GPU_TOKEN only: a flag would show it in `ps` while servers start.
    parser.add_argument("--token", dest="token_flag", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--insecure-no-token", action="store_true",
                        help="allow a non-loopback --host without IMGPIPE_GPU_TOKEN (trusted private network only)")
    parser.add_argument("--host", default="127.0.0.1", help="address the servers bind")
    parser.add_argument("--registry-url", default=None,
                        help="project database the servers register in (default: $IMGPIPE_DATABASE_URL)")
    parser.add_argument("--advertise-host", default=None,
                        help="host name other machines reach the servers at (default: --host, or this "
                        "machine's name when --host is 0.0.0.0)")
    parser.add_argument("--idle-timeout", dest="idle_timeout_s", type=float, default=0.0,
                        help="seconds without work after which a server exits (0 = never)")
    parser.add_argument("--random-weights", action="store_true", help="random weights (benchmarks)")
    typed = {"bool": _bool_arg, "int": int, "float": float, "str": str}
    named = {"model_path", "random_weights", "device"}
    for name, info in GpuServerProfile.model_fields.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typed[info.annotation.__name__],
                            default=None, help="overrides the profile's value")  # fmt: skip
    for item in dataclasses.fields(ModelSettings):
        if item.name not in named and item.name not in GpuServerProfile.model_fields:
            parser.add_argument("--" + item.name.replace("_", "-"), dest=item.name,
                                type=typed[str(item.type)], default=None)  # fmt: skip
    for name, kind in (("max_request_images", int), ("max_request_bytes", int), ("max_connections", int),
                       ("header_timeout_s", float), ("body_timeout_s", float)):  # fmt: skip
        parser.add_argument("--" + name.removesuffix("_s").replace("_", "-"), dest=name, type=kind, default=None)


def _bool_arg(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def settings_from_options(options: argparse.Namespace, bearer_token: str | None = None) -> ServerSettings:
    """The servers' settings: the profile through settings_map, then the flags given."""
    from imgpipe_dagster.gpu_server.settings import ModelSettings
    from imgpipe_dagster.profiles import GpuServerProfile, resolve
    from imgpipe_dagster.settings_map import model_settings, server_settings

    values = vars(options)
    profile_overrides = {name: values[name] for name in GpuServerProfile.model_fields}
    _, gpu = resolve(options.profile, gpu_overrides=profile_overrides)
    model_extra = {item.name: values[item.name] for item in dataclasses.fields(ModelSettings)
                   if values.get(item.name) is not None and item.name not in GpuServerProfile.model_fields
                   and item.name != "model_path"}  # fmt: skip
    if options.random_weights:
        model_extra["random_weights"] = True
    deployment = {name: values[name] for name in ("max_request_images", "max_request_bytes", "max_connections",
                                                  "header_timeout_s", "body_timeout_s") if values[name] is not None}  # fmt: skip
    return server_settings(
        gpu, model_settings(gpu, options.model_path, **model_extra),
        host=options.host, bearer_token=bearer_token, idle_timeout_s=options.idle_timeout_s,
        insecure_no_token=options.insecure_no_token, **deployment,
    ).replace(registry_url=options.registry_url, advertise_host=options.advertise_host)  # fmt: skip


def launcher_main(argv: Sequence[str] | None = None, bearer_token: str | None = None) -> int:
    """`start|stop|status` for the servers under --state-dir; prints JSON. Returns the exit code.
    ``bearer_token``: the servers' token (the CLI passes $IMGPIPE_GPU_TOKEN)."""
    parser = argparse.ArgumentParser(
        prog="imgpipe gpu-server", description="Manage the per-GPU inference servers."
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", default=None, help="server records (default $IMGPIPE_HOME/gpu-servers)")
    parser.add_argument(
        "--devices", default=None, help="comma-separated devices (cuda:0,cuda:1 or cpu); default: every GPU"
    )
    parser.add_argument("--base-port", type=int, default=8000, help="first server's port; 0: any free ports")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    _server_options(parser)
    options = parser.parse_args(argv)
    if options.token_flag is not None:
        print("imgpipe: --token is not taken (a command line shows in `ps`): set IMGPIPE_GPU_TOKEN instead",
              file=sys.stderr)  # fmt: skip
        return 2
    settings = None
    if options.action == "start":
        if not options.model_path:
            parser.error("start needs --model PATH")
        settings = settings_from_options(options, bearer_token)
    launcher = GpuServerLauncher(options.state_dir, settings, startup_timeout_s=options.startup_timeout,
                                 token=bearer_token)  # fmt: skip
    if options.action == "start":
        devices = options.devices.split(",") if options.devices else None
        try:
            endpoints = launcher.ensure(devices, base_port=options.base_port)
        except ServerStartError as error:
            print(f"imgpipe: {error}", file=sys.stderr)
            return 2
        print(json.dumps([{**endpoint.__dict__, "reused": endpoint.reused} for endpoint in endpoints], indent=2))
    elif options.action == "stop":
        print(json.dumps({"stopped_ports": launcher.stop()}))
    else:
        print(json.dumps(launcher.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(launcher_main())
