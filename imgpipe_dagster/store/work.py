"""Claiming work with leases, and writing outcomes exactly once.

A run leases the URLs it processes (``lease_owner`` = its run id). An outcome is written by one
statement that moves the URL out of *this run's* lease and upserts its result row, so a URL whose
lease was taken over by another run (ours expired) is never written twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

from imgpipe_dagster.store.versions import UNVERSIONED

log = logging.getLogger("imgpipe.store")

FINAL_STATES = ("done", "failed_permanent")
UNFINISHED_STATES = ("pending", "leased", "failed_retryable")


@dataclass(frozen=True)
class ClaimedUrl:
    url_hash: bytes
    url: str
    shard_id: str
    attempts: int


@dataclass
class UrlOutcome:
    """What became of one leased URL. ``state`` is the URL's next state:
    done / failed_permanent (final, with a result row), failed_retryable (backoff until
    ``next_attempt_at``) or pending (returned without spending its retry budget)."""

    url_hash: bytes
    url: str
    shard_id: str
    state: str
    attempts: int
    error_class: str | None = None
    error_message: str | None = None
    next_attempt_at: datetime | None = None
    result: dict = field(default_factory=dict)  # url_analysis_results columns (see RESULT_COLUMNS)


RESULT_COLUMNS = (
    "http_status", "content_type", "bytes", "width", "height", "format", "sha256", "phash",
    "model_text", "analysis", "parse_ok", "model", "prompt_version", "prompt_tokens",
    "generated_tokens", "download_ms", "inference_ms", "gpu", "reused_from",
)  # fmt: skip

_STAGING_COLUMNS = (
    "url_hash", "url", "shard_id", "new_state", "attempts", "error_class", "error_message",
    "next_attempt_at", *RESULT_COLUMNS,
)  # fmt: skip

_CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging_outcomes (
    url_hash bytea, url text, shard_id text, new_state url_state, attempts integer,
    error_class text, error_message text, next_attempt_at timestamptz,
    http_status integer, content_type text, bytes integer, width integer, height integer, format text,
    sha256 text, phash bigint, model_text text, analysis jsonb, parse_ok boolean, model text,
    prompt_version text, prompt_tokens integer, generated_tokens integer, download_ms real,
    inference_ms real, gpu text, reused_from bytea
) ON COMMIT DELETE ROWS
"""

_RESULT_INSERT_COLUMNS = ("url_hash", "url", "shard_id", "status", "attempts", "error_class", "error_message",
                          "run_id", "analysis_version", *RESULT_COLUMNS)  # fmt: skip

# One statement: leave our lease, then upsert the result rows of the URLs that reached a final state.
# The UPDATE returns the staged columns itself, so no second join against the staging table is needed.
_APPLY_OUTCOMES = f"""
WITH owned AS (
    UPDATE corpus_urls c
       SET state = s.new_state,
           attempts = s.attempts,
           last_error_class = s.error_class,
           last_error = s.error_message,
           next_attempt_at = s.next_attempt_at,
           lease_owner = NULL,
           lease_expires_at = NULL,
           updated_at = now()
      FROM staging_outcomes s
     WHERE c.url_hash = s.url_hash AND c.state = 'leased' AND c.lease_owner = %(owner)s
 RETURNING s.*
), written AS (
    INSERT INTO url_analysis_results ({", ".join(_RESULT_INSERT_COLUMNS)})
    SELECT o.url_hash, o.url, o.shard_id,
           CASE WHEN o.new_state = 'done' THEN 'ok' ELSE 'failed' END,
           o.attempts, o.error_class, o.error_message, %(owner)s, %(version)s,
           {", ".join("o." + c for c in RESULT_COLUMNS)}
      FROM owned o
     WHERE o.new_state IN ('done', 'failed_permanent')
    ON CONFLICT (url_hash, analysis_version) DO UPDATE SET
           {", ".join(f"{c} = EXCLUDED.{c}" for c in _RESULT_INSERT_COLUMNS[1:] if c != "analysis_version")},
           created_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM owned), (SELECT count(*) FROM written)
"""  # noqa: S608 - column names are constants of this module, values are parameters


# A URL is claimable when it is pending or retryable and due (a pending URL may carry a due time: a
# host that asked us to wait, which costs the URL no retry), or leased by someone whose lease expired.
_DUE = "(next_attempt_at IS NULL OR next_attempt_at <= now())"

# Retries that came due and expired leases are picked before fresh URLs, so a retry happens while
# fresh work still flows instead of in a tail after the first pass.
# Only shards bound to the claimer's analysis version are claimed (store/versions.py; any shard when it
# names none; an unversioned claimer takes the shards no version has bound yet). FOR SHARE keeps a
# concurrent rebind of the shard from slipping between.
_CLAIM = f"""
WITH bound AS (
    SELECT shard_id FROM shards
     WHERE shard_id = ANY(%(shards)s)
       AND (%(version)s::text IS NULL OR coalesce(analysis_version, %(unversioned)s) = %(version)s)
       FOR SHARE
), again AS (
    SELECT url_hash FROM corpus_urls
     WHERE shard_id IN (SELECT shard_id FROM bound)
       AND ((state = 'failed_retryable' AND {_DUE}) OR (state = 'leased' AND lease_expires_at < now()))
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), fresh AS (
    SELECT url_hash FROM corpus_urls
     WHERE shard_id IN (SELECT shard_id FROM bound) AND state = 'pending' AND {_DUE}
     LIMIT greatest(%(limit)s - (SELECT count(*) FROM again), 0)
       FOR UPDATE SKIP LOCKED
)
UPDATE corpus_urls c
   SET state = 'leased', lease_owner = %(owner)s,
       lease_expires_at = now() + make_interval(secs => %(lease_s)s), updated_at = now()
  FROM (SELECT url_hash FROM again UNION ALL SELECT url_hash FROM fresh) pick
 WHERE c.url_hash = pick.url_hash
RETURNING c.url_hash, c.url, c.shard_id, c.attempts
"""  # noqa: S608 - fixed fragments of this module only


def claim(
    conn: psycopg.Connection, owner: str, shard_ids: Sequence[str], limit: int, lease_s: float,
    analysis_version: str | None = None,
) -> list[ClaimedUrl]:
    """Lease up to ``limit`` claimable URLs of the shards (of those bound to ``analysis_version``, when
    given): due retries and expired leases first, then due pending URLs. SKIP LOCKED lets concurrent
    runs claim side by side."""
    rows = conn.execute(
        _CLAIM, {"owner": owner, "lease_s": lease_s, "shards": list(shard_ids), "limit": limit,
                 "version": analysis_version, "unversioned": UNVERSIONED},
    ).fetchall()
    conn.commit()
    return [ClaimedUrl(bytes(h), url, shard, attempts) for h, url, shard, attempts in rows]


@dataclass(frozen=True)
class Leftover:
    """What of a set of shards is not final, as the end of a run sees it."""

    # pending, or retryable and due, or leased with an expired lease: a run can take it now
    claimable: int = 0
    # retryable or deferred with a due time in the future (left in the pool for a later run)
    waiting: int = 0
    # leased by a live run (its lease has not expired)
    leased: int = 0
    # earliest and latest due time of the waiting URLs
    next_due_at: datetime | None = None
    last_due_at: datetime | None = None

    @property
    def unfinished(self) -> int:
        return self.claimable + self.waiting + self.leased


def leftover(conn: psycopg.Connection, shard_ids: Sequence[str]) -> Leftover:
    row = conn.execute(
        f"""
        SELECT count(*) FILTER (WHERE state IN ('pending', 'failed_retryable') AND {_DUE}
                                   OR state = 'leased' AND lease_expires_at < now()),
               count(*) FILTER (WHERE state IN ('pending', 'failed_retryable') AND NOT {_DUE}),
               count(*) FILTER (WHERE state = 'leased' AND lease_expires_at >= now()),
               min(next_attempt_at) FILTER (WHERE state IN ('pending', 'failed_retryable') AND NOT {_DUE}),
               max(next_attempt_at) FILTER (WHERE state IN ('pending', 'failed_retryable') AND NOT {_DUE})
          FROM corpus_urls
         WHERE shard_id = ANY(%s) AND state IN ('pending', 'leased', 'failed_retryable')
        """,  # noqa: S608 - fixed fragments only
        (list(shard_ids),),
    ).fetchone()
    return Leftover(*row)


def renew_leases(conn: psycopg.Connection, owner: str, lease_s: float) -> int:
    """Extend the owner's leases. Rows an outcome write holds locked are skipped: they are leaving
    the lease, and waiting on them (in whatever order the scan meets them) deadlocks with that write."""
    cur = conn.execute(
        "UPDATE corpus_urls c SET lease_expires_at = now() + make_interval(secs => %s)"
        " FROM (SELECT url_hash FROM corpus_urls WHERE state = 'leased' AND lease_owner = %s"
        "       FOR UPDATE SKIP LOCKED) mine"
        " WHERE c.url_hash = mine.url_hash",
        (lease_s, owner),
    )
    conn.commit()
    return cur.rowcount


def release_leases(conn: psycopg.Connection, owner: str) -> int:
    """Return every URL this owner still leases to pending without spending a retry (a crashed run,
    a failed run's cleanup, a GPU outage at the end of a run); claimable at once."""
    cur = conn.execute(
        "UPDATE corpus_urls SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL,"
        " next_attempt_at = NULL, updated_at = now()"
        " WHERE state = 'leased' AND lease_owner = %s",
        (owner,),
    )
    conn.commit()
    return cur.rowcount


def hand_back_tail(
    conn: psycopg.Connection, owner: str, shard_ids: Sequence[str], wait_for_s: float, due_in_s: float
) -> int:
    """A run leaves its tail to a later run (engine/tail.py): the URLs it still leases go back to
    pending, and its shards' URLs in the pool due within ``wait_for_s`` (the run would have waited for
    them), all due in ``due_in_s`` seconds. No retry is spent and no due time is brought forward.
    Returns the URLs handed back."""
    cur = conn.execute(
        """
        UPDATE corpus_urls
           SET state = CASE WHEN state = 'leased' THEN 'pending'::url_state ELSE state END,
               lease_owner = NULL, lease_expires_at = NULL,
               next_attempt_at = now() + make_interval(secs => %(due_in_s)s), updated_at = now()
         WHERE (state = 'leased' AND lease_owner = %(owner)s)
            OR (shard_id = ANY(%(shards)s) AND state IN ('pending', 'failed_retryable')
                AND next_attempt_at > now()
                AND next_attempt_at <= now() + make_interval(secs => least(%(wait_for_s)s, %(due_in_s)s)))
        """,
        {"owner": owner, "shards": list(shard_ids), "wait_for_s": wait_for_s, "due_in_s": due_in_s},
    )
    conn.commit()
    return cur.rowcount


def _staging_row(outcome: UrlOutcome) -> tuple:
    result = outcome.result
    analysis = result.get("analysis")
    values = []
    for column in RESULT_COLUMNS:
        value = result.get(column)
        if column == "analysis" and analysis is not None:
            value = Jsonb(analysis)
        elif isinstance(value, str):
            value = value.replace("\x00", "")  # Postgres text cannot hold NUL (model output can)
        values.append(value)
    return (
        outcome.url_hash, outcome.url, outcome.shard_id, outcome.state, outcome.attempts,
        outcome.error_class, _clip(outcome.error_message), outcome.next_attempt_at, *values,
    )  # fmt: skip


def _clip(message: str | None, limit: int = 2000) -> str | None:
    if message is None:
        return None
    message = message.replace("\x00", "")
    return message if len(message) <= limit else message[: limit - 1] + "…"


def write_outcomes(
    conn: psycopg.Connection, owner: str, outcomes: Sequence[UrlOutcome], analysis_version: str = UNVERSIONED
) -> tuple[int, int]:
    """COPY the chunk into a staging table, then apply it in one statement, in one transaction; result
    rows are written under ``analysis_version``. Returns (URLs whose state moved, result rows written)."""
    if not outcomes:
        return 0, 0
    with conn.transaction():
        conn.execute(_CREATE_STAGING)
        with conn.cursor() as cur:
            with cur.copy(f"COPY staging_outcomes ({', '.join(_STAGING_COLUMNS)}) FROM STDIN") as copy:
                for outcome in outcomes:
                    copy.write_row(_staging_row(outcome))
            moved, written = cur.execute(_APPLY_OUTCOMES, {"owner": owner, "version": analysis_version}).fetchone()
    if moved < len(outcomes):
        log.warning("%d of %d outcomes skipped: their lease was no longer held by %s", len(outcomes) - moved,
                    len(outcomes), owner)
    return moved, written


def write_outcomes_executemany(
    conn: psycopg.Connection, owner: str, outcomes: Sequence[UrlOutcome], analysis_version: str = UNVERSIONED
) -> tuple[int, int]:
    """The same semantics row by row (executemany): the baseline bench/pipeline.py compares against."""
    moved = written = 0
    columns = ", ".join(_RESULT_INSERT_COLUMNS)
    placeholders = ", ".join(["%s"] * len(_RESULT_INSERT_COLUMNS))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _RESULT_INSERT_COLUMNS[1:] if c != "analysis_version")
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "UPDATE corpus_urls SET state = %s, attempts = %s, last_error_class = %s, last_error = %s,"
            " next_attempt_at = %s, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
            " WHERE url_hash = %s AND state = 'leased' AND lease_owner = %s",
            [(o.state, o.attempts, o.error_class, _clip(o.error_message), o.next_attempt_at, o.url_hash, owner)
             for o in outcomes],
        )
        moved = len(outcomes)
        finals = [o for o in outcomes if o.state in FINAL_STATES]
        cur.executemany(
            f"INSERT INTO url_analysis_results ({columns}) VALUES ({placeholders})"  # noqa: S608
            f" ON CONFLICT (url_hash, analysis_version) DO UPDATE SET {updates}, created_at = now()",
            [
                (o.url_hash, o.url, o.shard_id, "ok" if o.state == "done" else "failed", o.attempts,
                 o.error_class, _clip(o.error_message), owner, analysis_version, *_staging_row(o)[8:])
                for o in finals
            ],
        )
        written = len(finals)
    return moved, written


def shard_state_counts(conn: psycopg.Connection, shard_ids: Sequence[str]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT state::text, count(*) FROM corpus_urls WHERE shard_id = ANY(%s) GROUP BY 1", (list(shard_ids),)
    ).fetchall()
    counts = dict.fromkeys(FINAL_STATES + UNFINISHED_STATES, 0)
    counts.update({state: n for state, n in rows})
    return counts


def dumps_for_log(value) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))
