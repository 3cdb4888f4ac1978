"""A GPU server announces itself in the project database and beats while it lives (store/gpu_registry.py).

``RegistryHeartbeat`` runs in a thread of the server process beside the HTTP server: it writes the
server's row at once, renews it every ``registry_heartbeat_s`` seconds with the server's status and
queue, writes it again when the row went missing (a database restored, a successor took the URL and
left), and deletes it on a clean stop. A database that cannot be reached costs a log line per beat,
never the server: it keeps answering requests and registers once the database is back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from imgpipe_dagster.gpu_server.settings import ServerSettings, settings_hash
from imgpipe_dagster.store import gpu_registry
from imgpipe_dagster.store.gpu_registry import RegisteredServer

log = logging.getLogger("imgpipe_dagster.gpu_server")

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
# Protocols the project's server answers: its own /v1/analyze and the OpenAI chat completions.
SERVER_API = "native+openai"


def advertised_url(settings: ServerSettings) -> str:
    """The base URL others should use: ``advertise_host``, else the bound address (the machine's host
    name when it binds every interface), with the server's port."""
    host = settings.advertise_host or (socket.gethostname() if settings.host in WILDCARD_HOSTS else settings.host)
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def model_name(model_path: str) -> str:
    """The name a model is matched by across machines (its checkpoint directory's name), as the
    inference engine reports it."""
    return Path(model_path.rstrip("/")).name or model_path


class ServerFigures:
    """What a beat reports about the running server; the app's state fills it (read from this thread:
    plain attribute reads of numbers and strings)."""

    def __init__(self, status: Callable[[], str], queue_size: Callable[[], int], processed: Callable[[], int],
                 settings: Callable[[], ServerSettings] | None = None):  # fmt: skip
        self.status = status
        self.queue_size = queue_size
        self.processed = processed
        # the settings in force (POST /v1/settings changes them live); None: those the server started with
        self.settings = settings


class RegistryHeartbeat:
    def __init__(self, database_url: str, settings: ServerSettings, figures: ServerFigures) -> None:
        self.database_url = database_url
        self.settings = settings
        self.figures = figures
        self.url = advertised_url(settings)
        self.pid = os.getpid()
        self.started_at = datetime.now(UTC)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat", daemon=True)
        # settings_hash of the row as last written: a live settings change writes the row again
        self._registered_hash: str | None = None

    def current_settings(self) -> ServerSettings:
        return self.figures.settings() if self.figures.settings is not None else self.settings

    def record(self) -> RegisteredServer:
        settings = self.current_settings()
        return RegisteredServer(
            url=self.url, api=SERVER_API, model=model_name(settings.model.model_path),
            model_path=settings.model.model_path, settings_hash=settings_hash(settings),
            device=settings.model.device, hostname=socket.gethostname(), pid=self.pid,
            status=self.figures.status(), max_batch_images=settings.max_batch_images,
            max_inference_batch_size=settings.max_inference_batch_size,
            max_concurrent_generations=settings.max_concurrent_generations,
            queue_capacity=settings.max_inference_queue_size, queue_size=self.figures.queue_size(),
            processed=self.figures.processed(), started_at=self.started_at,
        )  # fmt: skip

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop beating and delete the row (a clean exit leaves the live set at once)."""
        self._stop.set()
        self._thread.join(timeout_s)
        try:
            with psycopg.connect(self.database_url, connect_timeout=5, autocommit=True) as conn:
                gpu_registry.deregister(conn, self.url, self.pid)
        except psycopg.Error as error:
            log.warning("registry: could not remove %s (%s); it ages out of the live set", self.url, error)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # a connection per beat: a server holds no database session between beats
                with psycopg.connect(self.database_url, connect_timeout=5, autocommit=True) as conn:
                    self._beat(conn)
            except psycopg.Error as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                log.warning("registry: heartbeat failed (%s); trying again", first)
                self._registered_hash = None
            self._stop.wait(self.settings.registry_heartbeat_s)

    def _beat(self, conn: psycopg.Connection) -> None:
        current = settings_hash(self.current_settings())
        if self._registered_hash == current and gpu_registry.beat(
            conn, self.url, self.pid, self.figures.status(), self.figures.queue_size(), self.figures.processed()
        ):
            return
        gpu_registry.register(conn, self.record())
        if self._registered_hash is None:
            log.info("registry: registered as %s (beat every %.0f s)", self.url, self.settings.registry_heartbeat_s)
        self._registered_hash = current
