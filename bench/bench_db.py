"""A database of its own for a benchmark, on IMGPIPE_DATABASE_URL's server (else the embedded one)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.migrations import migrate


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, migrated database, dropped when the block ends."""
    server_url = os.environ.get("IMGPIPE_DATABASE_URL") or db.resolve_database_url()
    database_url = db.with_database(server_url, f"imgpipe_bench_{uuid.uuid4().hex[:6]}")
    db.ensure_database(database_url)
    try:
        with db.connect(database_url) as conn:
            migrate(conn)
        yield database_url
    finally:
        db.drop_database(database_url)
