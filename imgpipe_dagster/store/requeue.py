"""Requeue: failed URLs back to pending, for a cause that has gone away (a host that was down, a
GPU bug since fixed).

A requeue takes the URLs in ``failed_permanent`` or ``failed_retryable`` whose last error class is
one of those asked for (optionally only of a host, of shards, or failed since a time), and in one
transaction:

* records the requeue (``requeues``) and each URL's failure as it was (``requeued_failures``), so the
  history of what failed is kept;
* removes the failed result rows of those URLs (a pending URL has no result row: ``store.verify``);
* sets them ``pending`` with their attempts reset and no due time, so the next run of their shard
  claims them like fresh URLs.

Running it again finds nothing more (the URLs are no longer failed) and records nothing. A URL a
run is working on (leased) is never touched. A dry run counts the same selection and changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg.types.json import Jsonb

# Classes the engine writes besides the fetch errors (engine/outcomes.py; no import: the store sits below it).
ENGINE_ERROR_CLASSES = ("inference_error",)


@dataclass(frozen=True)
class RequeueFilter:
    error_classes: tuple[str, ...]
    host: str | None = None  # host name as in the URL, optionally with :port
    shard_ids: tuple[str, ...] = ()
    failed_since: datetime | None = None  # the URL reached its failed state at or after this time

    def __post_init__(self) -> None:
        if not self.error_classes or not all(c.strip() for c in self.error_classes):
            raise ValueError("name at least one error class to requeue (e.g. http_5xx)")
        if self.failed_since is not None and self.failed_since.tzinfo is None:
            raise ValueError("failed_since needs a time zone")


@dataclass
class RequeueReport:
    dry_run: bool
    requeue_id: int | None = None
    urls_by_class: dict[str, int] = field(default_factory=dict)
    urls_by_state: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    result_rows_removed: int = 0

    @property
    def urls(self) -> int:
        return sum(self.urls_by_class.values())

    def lines(self) -> list[str]:
        verb = "would requeue" if self.dry_run else "requeued"
        out = [f"{verb} {self.urls} URL(s)" + (f" in {len(self.shards)} shard(s)" if self.shards else "")]
        out += [f"  {error_class}: {n}" for error_class, n in sorted(self.urls_by_class.items())]
        if self.urls_by_state:
            out.append("  was: " + ", ".join(f"{state} {n}" for state, n in sorted(self.urls_by_state.items())))
        if not self.dry_run and self.requeue_id is not None:
            out.append(f"requeue {self.requeue_id}: {self.result_rows_removed} failed result row(s) moved to "
                       "requeued_failures; the shards' next runs analyse the URLs again")  # fmt: skip
        return out


# The host is what lies between "scheme://" (and any user info) and the path; a filter without a port
# matches every port of that host.
_HOST = "lower(substring(c.url from '^[^:]+://(?:[^/?#@]*@)?([^/?#]*)'))"


def _selection(selected: RequeueFilter) -> tuple[str, dict]:
    where = ["c.state IN ('failed_permanent', 'failed_retryable')", "c.last_error_class = ANY(%(classes)s)"]
    params: dict = {"classes": list(selected.error_classes)}
    if selected.host:
        where.append(f"({_HOST} = %(host)s OR {_HOST} LIKE %(host_any_port)s)")
        host = selected.host.strip().lower()
        params |= {"host": host, "host_any_port": host.replace("\\", "\\\\").replace("%", "\\%")
                   .replace("_", "\\_") + ":%"}  # fmt: skip
    if selected.shard_ids:
        where.append("c.shard_id = ANY(%(shards)s)")
        params["shards"] = list(selected.shard_ids)
    if selected.failed_since is not None:
        where.append("c.updated_at >= %(since)s")
        params["since"] = selected.failed_since
    return " AND ".join(where), params


def _count(conn: psycopg.Connection, selected: RequeueFilter) -> RequeueReport:
    where, params = _selection(selected)
    rows = conn.execute(
        f"SELECT c.last_error_class, c.state::text, c.shard_id, count(*) FROM corpus_urls c "  # noqa: S608
        f"WHERE {where} GROUP BY 1, 2, 3",
        params,
    ).fetchall()
    return _tally(RequeueReport(dry_run=True), rows)


def _tally(report: RequeueReport, rows) -> RequeueReport:
    shards = set()
    for error_class, state, shard, n in rows:
        report.urls_by_class[error_class] = report.urls_by_class.get(error_class, 0) + n
        report.urls_by_state[state] = report.urls_by_state.get(state, 0) + n
        shards.add(shard)
    report.shards = sorted(shards)
    return report


def _move(where: str) -> str:
    # FOR UPDATE re-checks the selection on rows a run changed meanwhile (one it just leased drops out).
    # Every step reads the statement's snapshot, so the archive sees the result rows the delete removes.
    # A URL's state is its state under its shard's bound version (store/versions.py): only that version's
    # failed row goes; other versions' rows are their own history.
    return f"""
WITH picked AS (
    SELECT c.url_hash, c.url, c.shard_id, c.state, c.last_error_class, c.last_error, c.attempts, c.updated_at
      FROM corpus_urls c
     WHERE {where}
       FOR UPDATE
), moved AS (
    UPDATE corpus_urls c
       SET state = 'pending', attempts = 0, next_attempt_at = NULL, lease_owner = NULL,
           lease_expires_at = NULL, updated_at = now()
      FROM picked p
     WHERE c.url_hash = p.url_hash
 RETURNING p.*
), archived AS (
    INSERT INTO requeued_failures (requeue_id, url_hash, url, shard_id, state_before, error_class,
                                   error_message, attempts, http_status, failed_at)
    SELECT %(requeue_id)s, m.url_hash, m.url, m.shard_id, m.state, m.last_error_class,
           coalesce(r.error_message, m.last_error), m.attempts, r.http_status, coalesce(r.created_at, m.updated_at)
      FROM moved m LEFT JOIN url_analysis_results r
        ON r.url_hash = m.url_hash AND r.status = 'failed' AND r.analysis_version = coalesce((SELECT s.analysis_version FROM shards s WHERE s.shard_id = m.shard_id), 'unversioned')
    RETURNING 1
), removed AS (
    DELETE FROM url_analysis_results r USING moved m
     WHERE r.url_hash = m.url_hash AND r.status = 'failed' AND r.analysis_version = coalesce((SELECT s.analysis_version FROM shards s WHERE s.shard_id = m.shard_id), 'unversioned')
    RETURNING 1
)
SELECT m.last_error_class, m.state::text, m.shard_id, count(*), (SELECT count(*) FROM removed),
       (SELECT count(*) FROM archived)
  FROM moved m GROUP BY 1, 2, 3
"""  # noqa: S608 - fixed fragments of this module; values are parameters


class UnknownErrorClassError(ValueError):
    pass


def check_error_classes(conn: psycopg.Connection, error_classes: Sequence[str]) -> None:
    """A misspelt class would requeue nothing without a word: refuse a class that is neither one the
    pipeline writes nor one any failed URL carries."""
    from imgpipe_dagster.fetch.errors import ErrorClass  # here: the fetch package is heavy for a CLI start

    known = {c.value for c in ErrorClass} | set(ENGINE_ERROR_CLASSES)
    for error_class in error_classes:
        if error_class in known:
            continue
        seen = conn.execute(
            "SELECT 1 FROM corpus_urls WHERE last_error_class = %s"
            " AND state IN ('failed_permanent', 'failed_retryable') LIMIT 1",
            (error_class,),
        ).fetchone()
        if not seen:
            raise UnknownErrorClassError(
                f"unknown error class {error_class!r}: no failed URL has it; known classes: "
                + ", ".join(sorted(known))
            )


def requeue(
    conn: psycopg.Connection, selected: RequeueFilter, *, dry_run: bool = False, requested_by: str = "cli"
) -> RequeueReport:
    """Put the selected failed URLs back to pending (see the module's description)."""
    check_error_classes(conn, selected.error_classes)
    if dry_run:
        return _count(conn, selected)
    where, params = _selection(selected)
    with conn.transaction():
        (requeue_id,) = conn.execute(
            "INSERT INTO requeues (requested_by, error_classes, host, shard_ids, failed_since)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING requeue_id",
            (requested_by, list(selected.error_classes), selected.host, list(selected.shard_ids) or None,
             selected.failed_since),
        ).fetchone()  # fmt: skip
        rows = conn.execute(_move(where), params | {"requeue_id": requeue_id}).fetchall()
        report = _tally(RequeueReport(dry_run=False, requeue_id=requeue_id), [row[:4] for row in rows])
        report.result_rows_removed = rows[0][4] if rows else 0
        if rows:
            conn.execute("UPDATE requeues SET urls_by_class = %s WHERE requeue_id = %s",
                         (Jsonb(report.urls_by_class), requeue_id))  # fmt: skip
        else:  # nothing matched (e.g. the same requeue again): nothing to record
            conn.execute("DELETE FROM requeues WHERE requeue_id = %s", (requeue_id,))
            report.requeue_id = None
    conn.commit()  # also when the caller's connection was already inside a transaction
    return report


def requeued_history(conn: psycopg.Connection, url_hashes: Sequence[bytes]) -> list[tuple]:
    """(requeue id, URL, state before, error class) of every requeue of these URLs, oldest first."""
    return conn.execute(
        "SELECT requeue_id, url, state_before::text, error_class FROM requeued_failures"
        " WHERE url_hash = ANY(%s) ORDER BY requeue_id, url",
        (list(url_hashes),),
    ).fetchall()


_RELATIVE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 date or time (UTC unless it names a zone), or an age such as 90m, 6h, 2d."""
    value = text.strip()
    relative = _RELATIVE_RE.match(value.lower())
    if relative:
        age = timedelta(seconds=float(relative.group(1)) * _UNIT_S[relative.group(2)])
        return (now or datetime.now(UTC)) - age
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since {text!r}: give an ISO time (2026-12-01T05:00Z) or an age (90m, 6h, 2d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
