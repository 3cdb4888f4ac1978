"""The SQL a throttle tick runs, and where its decisions are stored.

Every read is bounded so a tick stays far below Dagster's 60 s sensor timeout on a 20M-URL corpus
(bench/throttle_tick.py measures it):

* the window reads at most ``window_max_rows`` newest results through the created_at index, plus
  the URLs that became retryable in the window through corpus_urls_retryable_recent (003);
* the backlog probes each shard through corpus_urls (shard_id, state) with the unfinished states
  as index condition (one probe per shard, 2,000 for a 20M corpus), stops at the candidates it
  needs, and counts unfinished URLs only up to a cap (the partial index, never the whole table).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import psycopg
from psycopg.types.json import Jsonb

from imgpipe_dagster.throttle import blame
from imgpipe_dagster.throttle.decide import TIMEOUT_CLASSES, Backlog, Decision, WindowStats

# Unfinished URLs are counted up to this many per tick (the exact count is progress_report's job).
URLS_UNFINISHED_CAP = 200_000

_WINDOW = """
WITH recent AS (
    SELECT status, error_class, inference_ms, download_ms, url
      FROM url_analysis_results
     WHERE created_at > now() - make_interval(secs => %(window_s)s)
     ORDER BY created_at DESC
     LIMIT %(cap)s
), retry AS (
    SELECT last_error_class, url
      FROM corpus_urls
     WHERE state = 'failed_retryable' AND updated_at > now() - make_interval(secs => %(window_s)s)
     LIMIT %(cap)s
), errors AS (
    SELECT error_class, url FROM recent WHERE status <> 'ok'
    UNION ALL
    SELECT last_error_class, url FROM retry
), hosts AS (
    SELECT substring(url from '^[^:]+://([^/?#]*)') AS host FROM recent
    UNION
    SELECT substring(url from '^[^:]+://([^/?#]*)') FROM retry
)
SELECT (SELECT count(*) FROM recent),
       (SELECT count(*) FROM recent WHERE status <> 'ok'),
       (SELECT count(*) FROM recent WHERE status <> 'ok' AND error_class = ANY(%(timeouts)s)),
       (SELECT count(*) FROM retry),
       (SELECT count(*) FROM retry WHERE last_error_class = ANY(%(timeouts)s)),
       (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY inference_ms) FROM recent),
       -- downloads that brought an image: hosts that hang until the deadline are the web's, not a
       -- sign that our network struggles
       (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY download_ms) FROM recent WHERE status = 'ok'),
       (SELECT coalesce(jsonb_agg(jsonb_build_array(cls, n)), '[]'::jsonb)
          FROM (SELECT coalesce(error_class, 'unknown') AS cls, count(*) AS n
                  FROM errors GROUP BY 1 ORDER BY 2 DESC LIMIT 5) top),
       (SELECT count(*) FROM errors WHERE error_class = ANY(%(web)s)),
       (SELECT count(*) FROM errors WHERE error_class = ANY(%(either)s)),
       (SELECT count(*) FROM hosts),
       (SELECT count(DISTINCT substring(url from '^[^:]+://([^/?#]*)')) FROM errors
         WHERE error_class = ANY(%(either)s))
"""

# A shard has claimable work when one of its URLs is pending or retryable and due, or leased
# by a run whose lease expired. The state list is the index condition; the rest filters its rows.
_CLAIMABLE = """
    EXISTS (SELECT 1 FROM corpus_urls c
             WHERE c.shard_id = s.shard_id
               AND c.state IN ('pending', 'failed_retryable', 'leased')
               AND (c.state IN ('pending', 'failed_retryable')
                    AND (c.next_attempt_at IS NULL OR c.next_attempt_at <= now())
                    OR (c.state = 'leased' AND c.lease_expires_at < now())))
"""

_WITH_WORK = """
    EXISTS (SELECT 1 FROM corpus_urls c
             WHERE c.shard_id = s.shard_id AND c.state IN ('pending', 'failed_retryable', 'leased'))
"""


def read_window(conn: psycopg.Connection, window_s: float, max_rows: int) -> WindowStats:
    row = conn.execute(
        _WINDOW,
        {"window_s": window_s, "cap": max_rows, "timeouts": list(TIMEOUT_CLASSES),
         "web": sorted(blame.WEB_SIDE), "either": sorted(blame.EITHER)},
    ).fetchone()  # fmt: skip
    (results, failed, timeouts, retryable, retryable_timeouts, p95_inference, p95_download, top,
     web_side, either, hosts, hosts_failing) = row  # fmt: skip
    ours = blame.spread_is_ours(hosts, hosts_failing)
    return WindowStats(
        window_s=window_s, results=results, failed=failed, timeouts=timeouts, retryable=retryable,
        retryable_timeouts=retryable_timeouts,
        p95_inference_ms=float(p95_inference) if p95_inference is not None else None,
        p95_download_ms=float(p95_download) if p95_download is not None else None,
        capped=results >= max_rows or retryable >= max_rows,
        top_errors=tuple((str(cls), int(n)) for cls, n in top),
        web_failed=web_side + (0 if ours else either),
        web_timeouts=0 if ours else timeouts + retryable_timeouts,
        hosts=hosts, hosts_failing=hosts_failing,
    )  # fmt: skip


def parked_shards(conn: psycopg.Connection, max_retries: int, within_hours: float) -> list[str]:
    """Shards whose runs failed more than ``max_retries`` times for one cause recently: their retry
    budget is spent, so neither the throttle nor the run-failure sensor requests them again."""
    rows = conn.execute(
        "SELECT DISTINCT shard FROM ("
        "  SELECT unnest(shard_ids) AS shard, cause FROM run_failures"
        "   WHERE failed_at > now() - make_interval(secs => %(within_s)s)) f"
        " GROUP BY shard, cause HAVING count(*) > %(max_retries)s ORDER BY shard",
        {"within_s": within_hours * 3600.0, "max_retries": max_retries},
    ).fetchall()
    return [shard for (shard,) in rows]


def read_backlog(
    conn: psycopg.Connection, exclude: Sequence[str], limit: int, parked: Sequence[str] = ()
) -> Backlog:
    """Backlog counts and up to ``limit`` claimable shards (shard order) outside ``exclude`` and ``parked``."""
    skip = sorted(set(exclude) | set(parked))
    candidates = conn.execute(
        f"SELECT s.shard_id FROM shards s WHERE NOT (s.shard_id = ANY(%(skip)s)) AND {_CLAIMABLE}"  # noqa: S608
        " ORDER BY s.shard_no LIMIT %(limit)s",
        {"skip": skip, "limit": limit},
    ).fetchall()
    shards_with_work = conn.execute(f"SELECT count(*) FROM shards s WHERE {_WITH_WORK}").fetchone()[0]  # noqa: S608
    urls = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM corpus_urls"
        " WHERE state IN ('pending', 'leased', 'failed_retryable') LIMIT %s) u",
        (URLS_UNFINISHED_CAP,),
    ).fetchone()[0]
    return Backlog(
        shards_with_work=shards_with_work, urls_unfinished=urls, urls_capped=urls >= URLS_UNFINISHED_CAP,
        candidates=tuple(c for (c,) in candidates), parked=tuple(parked),
    )  # fmt: skip


def shards_between(conn: psycopg.Connection, first: str, last: str) -> list[str]:
    """Shard ids from ``first`` to ``last`` in shard order (a backfill run's partition range)."""
    rows = conn.execute(
        "SELECT shard_id FROM shards WHERE shard_no BETWEEN"
        " (SELECT shard_no FROM shards WHERE shard_id = %s) AND (SELECT shard_no FROM shards WHERE shard_id = %s)"
        " ORDER BY shard_no",
        (first, last),
    ).fetchall()
    return [shard for (shard,) in rows]


def next_decision_id(conn: psycopg.Connection) -> int:
    """Reserve the id of the decision about to be made (it is part of its runs' run keys, so a key
    is never reused, even when the sensor's cursor is reset)."""
    return conn.execute(
        "SELECT nextval(pg_get_serial_sequence('throttle_decisions', 'decision_id'))"
    ).fetchone()[0]


def store_decision(
    conn: psycopg.Connection,
    decision_id: int,
    source: str,
    decision: Decision,
    inputs: dict,
    tick_ms: float | None,
) -> None:
    conn.execute(
        "INSERT INTO throttle_decisions (decision_id, source, action, profile, previous_profile, paused, reason,"
        " submitted, inputs, state, tick_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (decision_id, source, decision.action, decision.profile, decision.previous_profile, decision.paused,
         decision.reason, list(decision.submit), Jsonb(_plain(inputs)), Jsonb(_plain(_state_dict(decision))),
         tick_ms),
    )  # fmt: skip
    conn.commit()


def _state_dict(decision: Decision) -> dict:
    return json.loads(decision.state.to_cursor()) | {"verdict": decision.verdict, "limit": decision.limit,
                                                      "free_slots": decision.free_slots}  # fmt: skip


def _plain(value):
    """JSON-safe copy (tuples to lists, odd objects to strings)."""
    return json.loads(json.dumps(value, default=str))


def prune_decisions(conn: psycopg.Connection, keep_days: float) -> int:
    """Delete plain ticks (submit / hold / idle) older than ``keep_days``; changes and pauses stay."""
    cur = conn.execute(
        "DELETE FROM throttle_decisions WHERE decided_at < now() - make_interval(secs => %s)"
        " AND action IN ('submit', 'hold', 'idle')",
        (keep_days * 86400.0,),
    )
    conn.commit()
    return cur.rowcount


def latest_decision(conn: psycopg.Connection, source: str = "throttle") -> dict | None:
    row = conn.execute(
        "SELECT decision_id, decided_at, action, profile, paused, reason, submitted, state FROM throttle_decisions"
        " WHERE source = %s ORDER BY decision_id DESC LIMIT 1",
        (source,),
    ).fetchone()
    if row is None:
        return None
    keys = ("decision_id", "decided_at", "action", "profile", "paused", "reason", "submitted", "state")
    return dict(zip(keys, row, strict=True))


_DECISION_COLUMNS = (
    "decision_id, decided_at, source, action, profile, previous_profile, paused, reason, submitted"
)
_RECENT = f"SELECT {_DECISION_COLUMNS} FROM throttle_decisions ORDER BY decision_id DESC LIMIT %s"  # noqa: S608
_CHANGES = (
    f"SELECT {_DECISION_COLUMNS} FROM throttle_decisions"  # noqa: S608
    " WHERE action IN ('step_down', 'step_up', 'pause', 'resume') ORDER BY decided_at DESC LIMIT %s"
)


def recent_decisions(conn: psycopg.Connection, limit: int = 20, changes_only: bool = False) -> list[dict]:
    """Newest first; ``changes_only``: profile changes, pauses and resumes (progress_report lists these)."""
    rows = conn.execute(_CHANGES if changes_only else _RECENT, (limit,)).fetchall()
    keys = ("decision_id", "decided_at", "source", "action", "profile", "previous_profile", "paused", "reason",
            "submitted")  # fmt: skip
    return [dict(zip(keys, row, strict=True)) for row in rows]


# ----- run failures -----

_NUMBERS = re.compile(r"\b(0x)?[0-9a-f]*\d[0-9a-f]*\b", re.IGNORECASE)


def failure_cause(error_class: str | None, message: str | None) -> str:
    """Same cause, same text: the error class and the first line of its message with numbers, ids
    and hashes masked (two runs failing on the same thing for different shards compare equal)."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    return f"{error_class or 'unknown'}: {_NUMBERS.sub('#', first)}"[:300]


def failures_same_cause(
    conn: psycopg.Connection, shard_ids: Sequence[str], cause: str, within_hours: float
) -> int:
    """Most failures with ``cause`` recorded recently for any one of the shards."""
    row = conn.execute(
        "SELECT coalesce(max(n), 0) FROM (SELECT shard, count(*) AS n FROM ("
        "  SELECT unnest(shard_ids) AS shard FROM run_failures"
        "   WHERE shard_ids && %(shards)s AND cause = %(cause)s"
        "     AND failed_at > now() - make_interval(secs => %(within_s)s)) f"
        " WHERE shard = ANY(%(shards)s) GROUP BY shard) per_shard",
        {"shards": list(shard_ids), "cause": cause, "within_s": within_hours * 3600.0},
    ).fetchone()
    return row[0]


def record_failure(
    conn: psycopg.Connection,
    run_id: str,
    job_name: str,
    shard_ids: Sequence[str],
    cause: str,
    error: str | None,
    urls_released: int,
    failures: int,
    action: str,
    retry_run_key: str | None,
) -> bool:
    """Store one failed run; False when it was recorded before (the sensor saw it already)."""
    cur = conn.execute(
        "INSERT INTO run_failures (run_id, job_name, shard_ids, cause, error, urls_released, failures_same_cause,"
        " action, retry_run_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING",
        (run_id, job_name, list(shard_ids), cause, (error or "")[:4000], urls_released, failures, action,
         retry_run_key),
    )  # fmt: skip
    conn.commit()
    return cur.rowcount == 1
