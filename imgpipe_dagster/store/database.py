"""Which PostgreSQL the project uses, and the databases in it.

One setting, IMGPIPE_DATABASE_URL. Unset, the embedded server under $IMGPIPE_HOME/pg is started.
The project's tables live in one database and Dagster's storage in a sibling database
(``<name>_dagster``) on the same server.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from imgpipe_dagster.environment import DAGSTER_DATABASE_URL_ENV, DATABASE_URL_ENV, read_environment
from imgpipe_dagster.paths import imgpipe_home
from imgpipe_dagster.store.embedded import EmbeddedPostgres
from imgpipe_dagster.store.errors import ConfigurationError

DEFAULT_DATABASE = "imgpipe"
CONNECT_TIMEOUT_S = 10


def embedded_server() -> EmbeddedPostgres:
    return EmbeddedPostgres(imgpipe_home() / "pg")


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    return re.sub(r"(://[^:/@]*:)[^@]+@", r"\1***@", url)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or DEFAULT_DATABASE


def sqlalchemy_url(url: str) -> str:
    """Dagster (SQLAlchemy 2.1) picks psycopg 3 for a bare postgresql:// URL and its NOTIFY then
    fails; name the psycopg2 driver explicitly."""
    parts = urlsplit(url)
    scheme = "postgresql+psycopg2" if parts.scheme in ("postgresql", "postgres") else parts.scheme
    query = urlencode(parse_qsl(parts.query))
    return urlunsplit((scheme, parts.netloc, parts.path, query, parts.fragment))


def resolve_database_url(start_embedded: bool = True) -> str:
    """The project's database URL: IMGPIPE_DATABASE_URL, else the embedded server's."""
    configured = read_environment().database_url
    if configured:
        return checked_url(configured, DATABASE_URL_ENV)
    if not start_embedded:
        raise ConfigurationError(f"{DATABASE_URL_ENV} is unset and the embedded server was not started")
    server_url = embedded_server().start()
    return with_database(server_url, DEFAULT_DATABASE)


def checked_url(url: str, variable: str) -> str:
    """``url`` when it is a PostgreSQL URL, else ConfigurationError naming ``variable`` (never the
    value: it may hold a password)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):  # (no host is fine: libpq then takes its socket)
        raise ConfigurationError(
            f"{variable} is not a PostgreSQL URL: write it as postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE "
            f"(unset it to use the embedded server)"
        )
    return url


def dagster_database_url(url: str) -> str:
    return with_database(url, database_name(url) + "_dagster")


def connect(url: str, **kwargs) -> psycopg.Connection:
    try:
        return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, **kwargs)
    except psycopg.ProgrammingError:  # conninfo that psycopg cannot even parse
        # not echoed: a conninfo string spells its password as password=...
        raise ConfigurationError(f"the database address is not a PostgreSQL URL; check {DATABASE_URL_ENV}") from None
    except psycopg.OperationalError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigurationError(
            f"cannot connect to PostgreSQL at {redact(url)}: {redact(first_line)}; "
            f"check that the server runs and {DATABASE_URL_ENV} is right (unset it to use the embedded server)"
        ) from exc


def ensure_database(url: str) -> bool:
    """Create the URL's database if it is missing; True when it was created."""
    name = database_name(url)
    with connect(with_database(url, "postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        # A concurrent creator can win the race with either error.
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            return False
    return True


def drop_database(url: str) -> None:
    name = database_name(url)
    with connect(with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def prepare_databases(url: str) -> None:
    """Create both databases and bring the project's schema up to date."""
    from imgpipe_dagster.store.migrations import migrate

    ensure_database(url)
    ensure_database(dagster_database_url(url))
    with connect(url) as conn:
        migrate(conn)


def export_environment(url: str) -> dict[str, str]:
    """Environment for Dagster processes: the project URL and Dagster's storage URL."""
    env = {DATABASE_URL_ENV: url, DAGSTER_DATABASE_URL_ENV: sqlalchemy_url(dagster_database_url(url))}
    os.environ.update(env)
    return env
