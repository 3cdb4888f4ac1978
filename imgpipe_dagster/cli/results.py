"""`imgpipe export` and `imgpipe requeue`: the stored results as files, and failed URLs back to pending."""

from __future__ import annotations

import argparse
import json
import sys
import time

from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.errors import ConfigurationError
from imgpipe_dagster.store.migrations import migrate
from imgpipe_dagster.store.requeue import RequeueFilter, UnknownErrorClassError, parse_since, requeue
from imgpipe_dagster.store.results import DEFAULT_BATCH_ROWS, EXPORT_FORMATS, known_shards

PROGRESS_EVERY_S = 10.0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the results as one file per shard (Parquet, JSON lines or CSV)")
    p.add_argument("--out", metavar="DIR",
                   help="directory or pyarrow URI (s3://bucket/prefix, ...); default $IMGPIPE_EXPORT_URI, "
                        "else $IMGPIPE_HOME/export")  # fmt: skip
    p.add_argument("--shard", action="append", help="only these shards (repeatable); default every shard")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="parquet", help="file format (default: parquet)")
    p.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS,
                   help=f"rows read and written at a time: one Parquet row group (default: {DEFAULT_BATCH_ROWS})")
    p.add_argument("--analysis-version", help="only the results of this analysis (prompt) version")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("requeue", help="put failed URLs of an error class back to pending (attempts reset)")
    p.add_argument("--error-class", action="append", required=True, metavar="C",
                   help="error class to requeue, e.g. http_5xx (repeatable)")
    p.add_argument("--host", metavar="H", help="only URLs of this host (host or host:port)")
    p.add_argument("--shard", action="append", metavar="S", help="only these shards (repeatable)")
    p.add_argument("--since", metavar="T", help="only URLs that failed since T: ISO time or an age (90m, 6h, 2d)")
    p.add_argument("--dry-run", action="store_true", help="count what would be requeued, change nothing")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=cmd_requeue)


def cmd_export(args: argparse.Namespace) -> int:
    # pyarrow and pandas load only for this command, not for every `imgpipe` start
    from imgpipe_dagster.store.export import default_base_uri, export_shard, update_manifest

    if args.batch_rows < 1:
        raise ConfigurationError(f"--batch-rows must be at least 1, got {args.batch_rows}")
    base = args.out or default_base_uri()
    url = db.resolve_database_url()
    started = last_progress = time.monotonic()
    exported = []
    with db.connect(url) as conn:
        shards = known_shards(conn)
        if args.shard:
            unknown = sorted(set(args.shard) - set(shards))
            if unknown:
                raise ConfigurationError(f"unknown shard(s) {', '.join(unknown)}; `imgpipe status` lists the corpus")
            shards = [shard for shard in shards if shard in set(args.shard)]
        for shard in shards:
            exported.append(export_shard(conn, shard, base, args.format, batch_rows=args.batch_rows,
                                         analysis_version=args.analysis_version))  # fmt: skip
            if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                print(f"... {len(exported)}/{len(shards)} shards, {sum(e.rows for e in exported):,} rows",
                      file=sys.stderr, flush=True)  # fmt: skip
    manifest = update_manifest(base, exported)
    rows = sum(e.rows for e in exported)
    print(f"exported {rows:,} rows of {len(exported)} shard(s) as {args.format} to {base} "
          f"in {time.monotonic() - started:.1f} s; manifest: {len(manifest['files'])} file(s), "
          f"{manifest['rows']:,} rows")  # fmt: skip
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since) if args.since else None
        selected = RequeueFilter(tuple(args.error_class), host=args.host, shard_ids=tuple(args.shard or ()),
                                 failed_since=since)  # fmt: skip
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    with db.connect(db.resolve_database_url()) as conn:
        migrate(conn)  # a database from before the requeue tables gets them
        try:
            report = requeue(conn, selected, dry_run=args.dry_run, requested_by="cli")
        except UnknownErrorClassError as exc:
            raise ConfigurationError(str(exc)) from None
    if args.json:
        print(json.dumps({"dry_run": report.dry_run, "requeue_id": report.requeue_id, "urls": report.urls,
                          "urls_by_class": report.urls_by_class, "urls_by_state": report.urls_by_state,
                          "shards": report.shards}))  # fmt: skip
    else:
        print("\n".join(report.lines()))
    return 0
