"""`python -m imgpipe_dagster.gpu_server --settings-file PATH [--port-file PATH]`: one server.

The settings file is one ServerSettings JSON document (``ServerSettings.to_json``), validated on
load; the launcher writes it 0600 because it may carry the bearer token, which must never appear on
a command line. With ``port`` 0 the server binds any free port; ``--port-file`` receives the port it
got (written before the model loads), so callers never need to guess a free port. With a project
database (the settings' ``registry_url``, else ``IMGPIPE_DATABASE_URL``) the server registers there and
beats while it runs (registration.py); a clean exit, SIGTERM included, removes its row.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from imgpipe_dagster.gpu_server.registration import RegistryHeartbeat, ServerFigures
from imgpipe_dagster.gpu_server.settings import ServerSettings, SettingsError

# A fixed port may still be held for a moment by the server this one replaces: the leader of a killed
# multi-threaded process is reported gone while its other threads still hold its sockets.
BIND_RETRY_S = 15.0


def bind_socket(host: str, port: int, retry_s: float = BIND_RETRY_S) -> socket.socket:
    """A listening-ready socket on host:port (port 0: any free one), IPv4 or IPv6 as the host says."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + retry_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return sock
        except OSError as error:
            sock.close()
            if error.errno != errno.EADDRINUSE or port == 0 or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def write_port_file(path: Path, port: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(str(port))
    temporary.replace(path)  # readers never see a partial number


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def start_registry_heartbeat(settings: ServerSettings, state) -> RegistryHeartbeat | None:
    """Announce the server in the project database (settings' registry_url, else IMGPIPE_DATABASE_URL)."""
    from imgpipe_dagster.environment import read_environment

    database_url = settings.registry_url or read_environment().database_url
    if not database_url:
        return None
    figures = ServerFigures(
        status=lambda: state.status,
        queue_size=lambda: state.batcher.queued if state.batcher else 0,
        processed=lambda: state.batcher.stats.processed if state.batcher else 0,
        settings=lambda: state.settings,
    )
    heartbeat = RegistryHeartbeat(database_url, settings, figures)
    heartbeat.start()
    return heartbeat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgpipe_dagster.gpu_server", description=__doc__)
    parser.add_argument("--settings-file", required=True, type=Path, help="ServerSettings JSON document")
    parser.add_argument("--port-file", type=Path, default=None, help="receives the port the server bound")
    options = parser.parse_args(argv)
    try:
        settings = ServerSettings.from_json(options.settings_file.read_text())
    except (OSError, SettingsError) as error:
        print(f"gpu_server: cannot load {options.settings_file}: {error}", file=sys.stderr)
        return 2
    problem = settings.exposure_problem()
    if problem:
        print(f"gpu_server: {problem}", file=sys.stderr)
        return 2
    if settings.model.enable_memory_defrag and settings.model.device.startswith("cuda"):
        # Must be set before CUDA initialises; expandable segments curb fragmentation from varying batches.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as error:
        # one line the launcher can pass on, not a traceback in the log tail
        print(f"gpu_server: cannot listen on {settings.host}:{settings.port}: {error.strerror or error}",
              file=sys.stderr)  # fmt: skip
        return 2
    settings = settings.replace(port=sock.getsockname()[1])
    if options.port_file is not None:
        write_port_file(options.port_file, settings.port)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s gpu_server[{settings.port}] %(message)s",
        stream=sys.stderr,
    )

    import uvicorn

    from imgpipe_dagster.gpu_server.app import create_app
    from imgpipe_dagster.gpu_server.guard import (
        ConnectionLimits,
        GuardCounters,
        connection_cap,
        guarded_protocol,
    )

    server: uvicorn.Server | None = None

    def request_exit() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_exit=request_exit)
    limits = ConnectionLimits(settings.header_timeout_s, settings.body_timeout_s,
                              connection_cap(settings.max_connections))  # fmt: skip
    config = uvicorn.Config(
        app, workers=1, log_level="info", access_log=False, timeout_graceful_shutdown=60,
        http=guarded_protocol(limits, GuardCounters()),
        # the accept queue is bounded too: beyond it the kernel refuses, nothing reaches the process
        backlog=min(2048, limits.max_connections),
    )
    server = uvicorn.Server(config)
    heartbeat = start_registry_heartbeat(settings, app.state.server)
    if heartbeat is not None:
        # uvicorn drains on SIGTERM, then raises the signal again to end the process: with this handler
        # that ends as an exception, so the registry row is deleted below instead of ageing out.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.run(sockets=[sock])
    finally:
        if heartbeat is not None:
            heartbeat.stop()
    state = app.state.server
    if state.status == "failed":
        # the traceback is above in the log; this last line is the one the launcher reports
        cause = (state.load_error or "unknown cause").splitlines()[0]
        print(f"gpu_server: model failed to load: {cause}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
