"""Versioned SQL migrations from resources/sql, applied once each and recorded in schema_migrations."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from imgpipe_dagster.paths import resource_path

log = logging.getLogger("imgpipe.store")

_FILE_PATTERN = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
# Any constant works: it only serialises concurrent migrators on one database.
_ADVISORY_LOCK_KEY = 0x1A9B1BE


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def available_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or resource_path("sql")
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_PATTERN.match(path.name)
        if not match:
            raise ValueError(f"migration file name must look like 001_name.sql: {path.name}")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two migrations share a version in {folder}")
    return found


def applied_versions(conn: psycopg.Connection) -> dict[int, str]:
    rows = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY version").fetchall()
    return {version: checksum for version, checksum in rows}


def migrate(conn: psycopg.Connection, folder: Path | None = None) -> list[Migration]:
    """Apply the missing migrations in order, each in its own transaction; returns those applied."""
    applied: list[Migration] = []
    with conn.transaction():
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for migration in available_migrations(folder):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK_KEY,))
            done = applied_versions(conn)
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    log.warning(
                        "migration %03d_%s changed after it was applied; edit history with a new migration instead",
                        migration.version,
                        migration.name,
                    )
                continue
            # Migration files hold several statements and no parameters: psycopg sends them as one query.
            conn.execute(migration.path.read_text())
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied.append(migration)
            log.info("applied migration %03d_%s", migration.version, migration.name)
    return applied
