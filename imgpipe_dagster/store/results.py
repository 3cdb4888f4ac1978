"""Reading stored analyses back out: the one place that selects from url_analysis_results for
export, streamed with a server-side cursor so a shard of any size costs one batch of memory.

Results are kept per analysis version (store/versions.py): a reader names the version it wants, or
gets the version each shard is bound to (the one its URL states refer to).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import psycopg

from imgpipe_dagster.store.versions import UNVERSIONED

# The columns an export reads, in this order (rows come back as tuples of these).
RESULT_FIELDS = (
    "url", "shard_id", "status", "error_class", "error_message", "http_status", "content_type", "bytes",
    "width", "height", "format", "sha256", "phash", "model_text", "analysis", "parse_ok", "model",
    "prompt_version", "analysis_version", "reused", "prompt_tokens", "generated_tokens", "download_ms", "inference_ms", "gpu", "attempts",
    "created_at",
)  # fmt: skip

# Fields that are not a column of their own.
_FIELD_SQL = {"reused": "(r.reused_from IS NOT NULL)"}
_SELECT = ", ".join(_FIELD_SQL.get(name, f"r.{name}") for name in RESULT_FIELDS)

DEFAULT_BATCH_ROWS = 2048
# File formats of an export (store/export.py); named here so the command line lists them without
# importing pyarrow and pandas.
EXPORT_FORMATS = ("parquet", "jsonl", "csv")


def _where(shard_ids: Sequence[str], analysis_version: str | None) -> tuple[str, dict]:
    """Rows of the shards under ``analysis_version``, or under the version each shard is bound to."""
    where = (
        "r.shard_id = ANY(%(shards)s) AND r.analysis_version = coalesce(%(version)s,"
        " (SELECT s.analysis_version FROM shards s WHERE s.shard_id = r.shard_id), %(unversioned)s)"
    )
    return where, {"shards": list(shard_ids), "version": analysis_version, "unversioned": UNVERSIONED}


def stream_results(
    conn: psycopg.Connection,
    shard_ids: Sequence[str],
    *,
    analysis_version: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[list[tuple]]:
    """The result rows of the shards in batches of at most ``batch_rows`` tuples (``RESULT_FIELDS``),
    ordered by URL so an export of unchanged data is the same file. The rows stay on the server until
    fetched (a named cursor), inside a transaction of their own."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    where, params = _where(shard_ids, analysis_version)
    query = (
        f"SELECT {_SELECT} FROM url_analysis_results r "  # noqa: S608
        f"WHERE {where} ORDER BY r.shard_id, r.url"
    )  # column names are this module's constants, values are parameters
    with conn.transaction(), conn.cursor(name="imgpipe_results_stream") as cur:
        cur.itersize = batch_rows
        cur.execute(query, params)
        while rows := cur.fetchmany(batch_rows):
            yield rows


def count_results(
    conn: psycopg.Connection, shard_ids: Sequence[str], *, analysis_version: str | None = None
) -> dict[str, int]:
    """Result rows per shard (shards without any row count 0): what an export of them must hold."""
    where, params = _where(shard_ids, analysis_version)
    rows = conn.execute(
        f"SELECT r.shard_id, count(*) FROM url_analysis_results r WHERE {where} GROUP BY 1",  # noqa: S608
        params,
    ).fetchall()
    counts = dict.fromkeys(shard_ids, 0)
    counts.update(dict(rows))
    return counts


def known_shards(conn: psycopg.Connection) -> list[str]:
    return [shard for (shard,) in conn.execute("SELECT shard_id FROM shards ORDER BY shard_no").fetchall()]
