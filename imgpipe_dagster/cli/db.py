"""`imgpipe db up | down | url | migrate | status` and `imgpipe verify`: the project database."""

from __future__ import annotations

import argparse

from imgpipe_dagster.environment import read_environment
from imgpipe_dagster.local_instance import prepare_environment
from imgpipe_dagster.store import database as db

# `imgpipe verify --analysis-version bound`: each shard against the version it is bound to
BOUND_VERSIONS = "bound"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="manage the project database (embedded unless IMGPIPE_DATABASE_URL is set)")
    p.add_argument("action", choices=["up", "down", "url", "migrate", "status"])
    p.add_argument("--show-password", action="store_true", help="with url: print the password too")
    p.add_argument("--dagster", action="store_true",
                   help="with url: Dagster's storage URL (postgresql+psycopg2://…_dagster), the value of "
                        f"{db.DAGSTER_DATABASE_URL_ENV} that `dagster job launch/execute` from a shell needs")
    p.set_defaults(handler=cmd_db)

    p = sub.add_parser("verify", help="check that every URL is in exactly one final state with its result row")
    p.add_argument("--shard", action="append", help="limit to these shards (repeatable)")
    p.add_argument("--require-complete", action="store_true", help="exit 1 while URLs are still unfinished")
    p.add_argument("--analysis-version", metavar="V",
                   help="the analysis version to check (default: the configured prompt and model's; "
                        f"'{BOUND_VERSIONS}': each shard's own)")  # fmt: skip
    p.set_defaults(handler=cmd_verify)


def cmd_db(args: argparse.Namespace) -> int:
    if args.action == "up":
        url = prepare_environment()
        print(db.redact(url))
    elif args.action == "url":
        url = db.resolve_database_url()
        if args.dagster:
            url = db.sqlalchemy_url(db.dagster_database_url(url))
        print(url if args.show_password else db.redact(url))
    elif args.action == "migrate":
        from imgpipe_dagster.store.migrations import migrate

        url = db.resolve_database_url()
        db.ensure_database(url)
        with db.connect(url) as conn:
            applied = migrate(conn)
        print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.version:03d}_{m.name}" for m in applied))
    elif args.action == "down":
        if read_environment().database_url:
            print(f"{db.DATABASE_URL_ENV} points at an external server; nothing to stop")
            return 0
        stopped = db.embedded_server().stop()
        print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
    elif args.action == "status":
        status = db.embedded_server().status()
        state = f"running, pid {status.pid}" if status.running else "stopped"
        print(f"embedded PostgreSQL in {status.data_dir}: {state}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from imgpipe_dagster.store.verify import verify
    from imgpipe_dagster.versioning import configured_analysis_version

    version = args.analysis_version or configured_analysis_version().label
    url = db.resolve_database_url()
    with db.connect(url) as conn:
        report = verify(conn, args.shard or None, analysis_version=None if version == BOUND_VERSIONS else version)
    print(f"analysis version: {version}")
    print("\n".join(report.lines()))
    if not report.ok:
        return 1
    return 0 if report.complete or not args.require_complete else 1
