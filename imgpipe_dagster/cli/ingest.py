"""`imgpipe ingest FILE...`: load URL files into the corpus and register their shards with Dagster.

The partitions go
into the Dagster instance at $DAGSTER_HOME, or the project's own ($IMGPIPE_HOME/dagster_home) when
DAGSTER_HOME is unset, so the UI's url_shards always match the shards table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from imgpipe_dagster.corpus.errors import CorpusInputError
from imgpipe_dagster.corpus.ingest import IngestReport, ingest_files
from imgpipe_dagster.corpus.shards import sync_shard_partitions
from imgpipe_dagster.corpus.sources import expand_paths, identify
from imgpipe_dagster.local_instance import dagster_home, prepare_environment
from imgpipe_dagster.store import database as db

PROGRESS_EVERY_S = 10.0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="load URL files (.txt/.csv/.tsv/.jsonl/.parquet, .gz/.zst) into the corpus")
    p.add_argument("files", nargs="+", metavar="FILE", help="files or glob patterns (quote globs)")
    p.add_argument("--column", "--url-column", dest="column", default="url", help="URL column of csv/tsv/jsonl/parquet files (default: url)")
    p.add_argument("--shard-size", type=int, default=10_000, help="URLs per shard (default: 10000)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--no-partitions", action="store_true",
                   help="do not register the shards as Dagster partitions (the corpus sensor or asset will)")
    p.set_defaults(handler=cmd_ingest)


def _summary(report: IngestReport) -> str:
    lines = []
    for f in report.files:
        if f["skipped"]:
            lines.append(f"{f['path']}: already ingested (file {f['file_id']}), nothing added")
            continue
        lines.append(f"{f['path']}: {f['rows_read']:,} rows, {f['added']:,} new URLs in {len(f['shards_added'])} "
                     f"shards, {f['duplicates']:,} duplicates, {f['rejected']:,} rejected")
    if report.rejected_by_reason:
        lines.append("rejected: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report.rejected_by_reason.items())))
    for sample in report.rejected_samples[:5]:
        lines.append(f"  e.g. line {sample['line']} ({sample['reason']}): {sample['value'][:100]}")
    totals = report.corpus_totals
    lines.append(f"corpus: {totals['urls']:,} URLs in {totals['shards']:,} shards from {totals['files']} files; "
                 f"{report.elapsed_s:.1f} s, {report.urls_per_s:,.0f} rows/s")
    return "\n".join(lines)


def _printer():
    last = [time.monotonic()]

    def progress(state: dict) -> None:
        if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            print(f"... {state['rows_read']:,} rows, {state['added']:,} new URLs, {state['urls_per_s']:,.0f} rows/s",
                  file=sys.stderr, flush=True)

    return progress


def _register_partitions(conn, report: IngestReport | None) -> int:
    from dagster import DagsterInstance

    from imgpipe_dagster.assets.corpus import record_ingest_outside_a_run

    if not os.environ.get("DAGSTER_HOME"):
        dagster_home()
    with DagsterInstance.get() as instance:
        added = len(sync_shard_partitions(instance, conn))
        if report is not None:  # the UI shows url_corpus materialized, with its check, as after a UI ingest
            record_ingest_outside_a_run(instance, conn, report, added, source="cli")
        return added


def _register_partitions_safely(conn, report: IngestReport | None) -> int | None:
    """Also runs after a failed ingest (earlier files were committed); never hides that failure."""
    try:
        conn.rollback()  # leave no failed transaction behind before reading the shard list
        return _register_partitions(conn, report)
    except Exception as exc:  # noqa: BLE001 - reported, and the next ingest or the asset catches up
        print(f"imgpipe ingest: could not register url_shards partitions: {exc}", file=sys.stderr)
        return None


def cmd_ingest(args: argparse.Namespace) -> int:
    try:  # bad input is said before the database is even reached
        for path in expand_paths(args.files):
            identify(path)
    except CorpusInputError as exc:
        print(f"imgpipe ingest: {exc}", file=sys.stderr)
        return 2
    url = prepare_environment()
    report = None
    with db.connect(url) as conn:
        try:
            report = ingest_files(conn, args.files, url_column=args.column, shard_size=args.shard_size,
                                  progress=_printer())
        except CorpusInputError as exc:
            print(f"imgpipe ingest: {exc}", file=sys.stderr)
            return 2
        finally:
            added = None if args.no_partitions else _register_partitions_safely(conn, report)
    if args.json:
        print(json.dumps(report.as_dict() | {"partitions_added": added}, ensure_ascii=False))
    else:
        print(_summary(report))
        if added is not None:
            print(f"Dagster: {added} url_shards partitions added (DAGSTER_HOME={os.environ.get('DAGSTER_HOME')})")
    return 0
