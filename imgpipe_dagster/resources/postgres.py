from __future__ import annotations

from contextlib import contextmanager

import psycopg
from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr

from imgpipe_dagster.store import database as db

# URLs already migrated in this process: sensors build a new resource every tick.
_PREPARED: set[str] = set()


class PostgresResource(ConfigurableResource):
    """The project database: IMGPIPE_DATABASE_URL, else the embedded server (started on first use).
    The schema is migrated once per process on first use."""

    database_url: str | None = Field(
        default=None, description="libpq URL; empty means $IMGPIPE_DATABASE_URL, else the embedded server"
    )
    _resolved: str | None = PrivateAttr(default=None)

    def url(self) -> str:
        if self._resolved is None:
            url = self.database_url or db.resolve_database_url()
            if url not in _PREPARED:
                db.prepare_databases(url)
                _PREPARED.add(url)
            self._resolved = url
        return self._resolved

    @contextmanager
    def connect(self):
        with db.connect(self.url()) as conn:
            yield conn

    def execute(self, query: str, params=None) -> list[tuple]:
        with self.connect() as conn:
            cur: psycopg.Cursor = conn.execute(query, params)
            return cur.fetchall() if cur.description else []
