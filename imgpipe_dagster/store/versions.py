"""Results per analysis version, and the shard's binding to one version.

A URL has one result row per analysis version (url_analysis_results is keyed by (url_hash,
analysis_version)). corpus_urls.state is the URL's state under the version its shard is bound to
(shards.analysis_version). A run under another version first rebinds the shard (``bind_shards``): in one
transaction, each URL's state is set from its result under the new version (done, failed_permanent, or
pending when it has none), so a URL is analysed at most once per version, whatever crashed before, and
the old versions' rows stay untouched.

Readers (verify, checks, export) name the version they look at; None means each shard's bound one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

# Label of the rows written before versions existed (and of writers that name no version).
UNVERSIONED = "unversioned"

# The result columns an identical image's analysis lends to a URL that reuses it.
REUSED_COLUMNS = ("model_text", "analysis", "parse_ok", "model", "prompt_version", "prompt_tokens", "generated_tokens")


class ShardBusyError(RuntimeError):
    """A shard cannot change version while another live run holds leases on its URLs."""


def bind_shards(conn: psycopg.Connection, shard_ids: Sequence[str], version: str, owner: str) -> dict[str, str | None]:
    """Bind the shards to ``version`` before ``owner`` claims their URLs. Returns {shard: previous
    version} of the shards that changed. Raises ShardBusyError (and changes nothing) when a shard under
    another version still has URLs leased by a live run other than ``owner``."""
    changed: dict[str, str | None] = {}
    with conn.transaction():
        # FOR UPDATE waits for claims in flight (they hold the row FOR SHARE) and holds new ones off.
        rows = conn.execute(
            "SELECT shard_id, analysis_version FROM shards WHERE shard_id = ANY(%s) ORDER BY shard_id FOR UPDATE",
            (list(shard_ids),),
        ).fetchall()
        for shard_id, current in rows:
            if current == version:
                continue
            if current is None:
                _adopt(conn, shard_id, version)
            else:
                _rebind(conn, shard_id, current, version, owner)
            conn.execute("UPDATE shards SET analysis_version = %s WHERE shard_id = %s", (version, shard_id))
            changed[shard_id] = current
    return changed


def _adopt(conn: psycopg.Connection, shard_id: str, version: str) -> None:
    """A shard never bound: its states and its unversioned rows came from the prompt and model of that
    time, which the first versioned run takes as its own (no re-analysis after an upgrade)."""
    conn.execute(
        "UPDATE url_analysis_results SET analysis_version = %s WHERE shard_id = %s AND analysis_version = %s"
        " AND NOT EXISTS (SELECT 1 FROM url_analysis_results o WHERE o.url_hash = url_analysis_results.url_hash"
        "                 AND o.analysis_version = %s)",
        (version, shard_id, UNVERSIONED, version),
    )


def _rebind(conn: psycopg.Connection, shard_id: str, current: str, version: str, owner: str) -> None:
    busy = conn.execute(
        "SELECT count(*), min(lease_owner) FROM corpus_urls WHERE shard_id = %s AND state = 'leased'"
        " AND lease_expires_at >= now() AND lease_owner <> %s",
        (shard_id, owner),
    ).fetchone()
    if busy[0]:
        raise ShardBusyError(
            f"shard {shard_id} is being analysed under version {current} by run {busy[1]} ({busy[0]} URLs leased);"
            f" analyse it under {version} once that run ended"
        )
    # Expired leases of dead runs go too: their late writes find no lease and are dropped.
    conn.execute(
        """
        UPDATE corpus_urls c
           SET state = CASE r.status WHEN 'ok' THEN 'done' WHEN 'failed' THEN 'failed_permanent'
                                     ELSE 'pending' END::url_state,
               attempts = coalesce(r.attempts, 0), last_error_class = r.error_class, last_error = r.error_message,
               next_attempt_at = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
          FROM corpus_urls u
          LEFT JOIN url_analysis_results r ON r.url_hash = u.url_hash AND r.analysis_version = %(version)s
         WHERE u.shard_id = %(shard)s AND c.url_hash = u.url_hash
        """,
        {"shard": shard_id, "version": version},
    )


def shard_versions(conn: psycopg.Connection, shard_ids: Sequence[str]) -> dict[str, str | None]:
    return dict(
        conn.execute(
            "SELECT shard_id, analysis_version FROM shards WHERE shard_id = ANY(%s)", (list(shard_ids),)
        ).fetchall()
    )


def versions_of_shards(conn: psycopg.Connection, shard_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """{version: {status: rows}} over the shards: which versions hold results, and how many."""
    out: dict[str, dict[str, int]] = {}
    for version, status, n in conn.execute(
        "SELECT analysis_version, status, count(*) FROM url_analysis_results WHERE shard_id = ANY(%s) GROUP BY 1, 2",
        (list(shard_ids),),
    ).fetchall():
        out.setdefault(version, {})[status] = n
    return out


@dataclass(frozen=True)
class ReusableAnalysis:
    """An analysis of an image (by sha256) under one version that another URL with the same bytes may reuse."""

    source_url_hash: bytes  # the URL whose image the GPU analysed
    columns: dict  # REUSED_COLUMNS


def find_reusable(conn: psycopg.Connection, version: str, sha256s: Sequence[str]) -> dict[str, ReusableAnalysis]:
    """{sha256: analysis} of the digests already analysed successfully under ``version``."""
    if not sha256s:
        return {}
    rows = conn.execute(
        f"SELECT DISTINCT ON (sha256) sha256, coalesce(reused_from, url_hash), {', '.join(REUSED_COLUMNS)}"  # noqa: S608
        " FROM url_analysis_results WHERE sha256 = ANY(%s) AND status = 'ok' AND analysis_version = %s"
        " ORDER BY sha256, created_at",
        (list(sha256s), version),
    ).fetchall()
    return {row[0]: ReusableAnalysis(bytes(row[1]), dict(zip(REUSED_COLUMNS, row[2:], strict=True))) for row in rows}


@dataclass(frozen=True)
class DuplicateCounts:
    reused: int  # URLs whose analysis was copied from an identical image
    near_duplicates: int  # URLs whose image has the perceptual hash of another URL's different bytes


def duplicate_counts(conn: psycopg.Connection, shard_id: str, version: str) -> DuplicateCounts:
    """Exact duplicates reused, and near-duplicates (same 64-bit perceptual hash, other bytes) reported, not merged."""
    reused, near = conn.execute(
        """
        WITH ok AS (
            SELECT sha256, phash, reused_from FROM url_analysis_results
             WHERE shard_id = %(shard)s AND analysis_version = %(version)s AND status = 'ok'
        ), near AS (
            SELECT phash FROM ok WHERE phash IS NOT NULL GROUP BY phash HAVING count(DISTINCT sha256) > 1
        )
        SELECT (SELECT count(*) FROM ok WHERE reused_from IS NOT NULL),
               (SELECT count(*) FROM ok JOIN near USING (phash))
        """,
        {"shard": shard_id, "version": version},
    ).fetchone()
    return DuplicateCounts(reused=reused, near_duplicates=near)
