"""Shared fixtures: a real PostgreSQL (IMGPIPE_TEST_DATABASE_URL, else the embedded server), fresh
databases cut from migrated templates, and Dagster instances backed by the same server."""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.embedded import EmbeddedPostgres
from imgpipe_dagster.store.migrations import migrate

REPO_ROOT = Path(__file__).resolve().parent.parent
# The embedded server widens permissions on its parent folders: keep it out of pytest's 0700 tmp.
TEST_STATE_DIR = REPO_ROOT / ".imgpipe" / "test"


def _create_from_template(server_url: str, name: str, template: str) -> str:
    with db.connect(db.with_database(server_url, "postgres"), autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Identifier(template)
            )
        )
    return db.with_database(server_url, name)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a running server (database part irrelevant); the embedded one is stopped at the end."""
    configured = os.environ.get("IMGPIPE_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    # One server per pytest session, so concurrent sessions never stop each other's server.
    TEST_STATE_DIR.mkdir(parents=True, exist_ok=True)
    data_dir = TEST_STATE_DIR / f"pg-{os.getpid()}"
    server = EmbeddedPostgres(data_dir)
    url = server.start()
    yield url
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _templates(pg_server_url: str) -> Iterator[dict[str, str]]:
    """Per-run template databases: the project schema, and an initialised Dagster storage."""
    run = uuid.uuid4().hex[:8]
    project_tpl = f"imgpipe_test_{run}_tpl"
    dagster_tpl = f"imgpipe_test_{run}_dtpl"
    project_url = db.with_database(pg_server_url, project_tpl)
    db.ensure_database(project_url)
    with db.connect(project_url) as conn:
        migrate(conn)
    dagster_url = db.with_database(pg_server_url, dagster_tpl)
    db.ensure_database(dagster_url)
    from dagster._core.instance_for_test import instance_for_test

    with instance_for_test(overrides=_dagster_storage(dagster_url)):
        pass  # creating the instance runs Dagster's own schema migrations once
    created: list[str] = [project_tpl, dagster_tpl]
    yield {"project": project_tpl, "dagster": dagster_tpl, "run": run, "created": created}
    for name in reversed(created):
        db.drop_database(db.with_database(pg_server_url, name))


def _dagster_storage(url: str) -> dict:
    return {"storage": {"postgres": {"postgres_url": db.sqlalchemy_url(url)}}}


@pytest.fixture
def database_url(pg_server_url: str, _templates: dict) -> str:
    """A fresh, migrated project database for one test."""
    name = f"imgpipe_test_{_templates['run']}_{uuid.uuid4().hex[:8]}"
    _templates["created"].append(name)
    return _create_from_template(pg_server_url, name, _templates["project"])


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with db.connect(database_url) as connection:
        yield connection


@pytest.fixture
def dagster_database_url(pg_server_url: str, _templates: dict) -> str:
    name = f"imgpipe_test_{_templates['run']}_{uuid.uuid4().hex[:8]}_dagster"
    _templates["created"].append(name)
    return _create_from_template(pg_server_url, name, _templates["dagster"])


@pytest.fixture
def dagster_instance(dagster_database_url: str, database_url: str, monkeypatch):
    """A Dagster instance on its own Postgres storage; the project URL is exported for resources."""
    from dagster._core.instance_for_test import instance_for_test

    monkeypatch.setenv(db.DATABASE_URL_ENV, database_url)
    monkeypatch.setenv(db.DAGSTER_DATABASE_URL_ENV, db.sqlalchemy_url(dagster_database_url))
    with instance_for_test(overrides=_dagster_storage(dagster_database_url)) as instance:
        yield instance


@pytest.fixture
def imgpipe_home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "imgpipe_home"
    home.mkdir()
    monkeypatch.setenv("IMGPIPE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL checkpoint (real config, tokenizer and processor files), built once."""
    from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture
def image_server():
    """The real image server on 127.0.0.1 (photos and every fault)."""
    from imgpipe_dagster_tests.web.image_server import ImageServer

    with ImageServer() as server:
        yield server


# Every process a test session starts inherits this mark, so the session can prove it left none behind.
SESSION_MARK = "IMGPIPE_TEST_SESSION"


def pytest_sessionstart(session):
    os.environ[SESSION_MARK] = str(os.getpid())
    # A shell starts background jobs with SIGINT ignored. Dagster's in-process execution copies
    # SIGINT's handler onto SIGTERM, so every process the tests start afterwards would inherit an
    # ignored SIGTERM and outlive its stop. Give the session the interactive default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
    """Stop (and report) any process this session started and left running: GPU servers, image
    servers, Dagster daemons. `make test` must leave no stray process."""
    import psutil

    me = str(os.getpid())
    strays = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(SESSION_MARK) == me:
                strays.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    for process in strays:
        print(f"\nstray process left by the tests, stopping it: {process.pid} {' '.join(process.info['cmdline'] or [])[:160]}")
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(strays, timeout=10)
    for process in alive:  # SIGTERM ignored or stuck: it must not outlive the session anyway
        print(f"\nstray process {process.pid} ignored SIGTERM; killing it")
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
