"""Shard ids, corpus totals, and keeping Dagster's url_shards partitions equal to the shards table.

No Dagster import here: ``sync_shard_partitions`` takes any object with a DagsterInstance's
``get_dynamic_partitions`` / ``add_dynamic_partitions`` / ``delete_dynamic_partition`` methods.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

log = logging.getLogger("imgpipe.corpus")

URL_SHARDS = "url_shards"  # Dagster's dynamic partitions of shards (imgpipe_dagster.partitions builds them)
SHARD_DIGITS = 6
_ADD_CHUNK = 1000


def shard_id(shard_no: int) -> str:
    """``s000001`` for shard 1: sorts in shard order up to 999,999 shards and is a valid partition key."""
    return f"s{shard_no:0{SHARD_DIGITS}d}"


def shard_key_sql(number: str | sql.Composable) -> sql.Composable:
    """The SQL twin of ``shard_id`` for an integer expression."""
    expr = sql.SQL(number) if isinstance(number, str) else number
    return sql.SQL("('s' || lpad(({n})::text, greatest({d}, length(({n})::text)), '0'))").format(
        n=expr, d=sql.Literal(SHARD_DIGITS))


def shard_ids(conn: psycopg.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT shard_id FROM shards ORDER BY shard_no")]


def corpus_totals(conn: psycopg.Connection) -> dict:
    """Whole-corpus counts, cheap on 20M URLs (shard sizes instead of counting URL rows)."""
    files, shards, urls = conn.execute(
        "SELECT (SELECT count(*) FROM corpus_files), count(*), coalesce(sum(url_count), 0) FROM shards"
    ).fetchone()
    return {"files": int(files), "shards": int(shards), "urls": int(urls)}


def sync_shard_partitions(instance, conn: psycopg.Connection, *, partitions_name: str = URL_SHARDS,
                          remove_stale: bool = False) -> list[str]:
    """Add the shard ids the Dagster instance lacks as dynamic partitions; returns those added.

    With ``remove_stale``, partitions without a shard (left by a reset database) are deleted too.
    """
    wanted = shard_ids(conn)
    present = set(instance.get_dynamic_partitions(partitions_name))
    missing = [key for key in wanted if key not in present]
    for start in range(0, len(missing), _ADD_CHUNK):
        instance.add_dynamic_partitions(partitions_name, missing[start : start + _ADD_CHUNK])
    if remove_stale:
        for key in sorted(present - set(wanted)):
            instance.delete_dynamic_partition(partitions_name, key)
    if missing:
        log.info("registered %d new %s partitions", len(missing), partitions_name)
    return missing
