"""What one run did to each of its shards, read back from the tables after the run: the shard's URL
states, this run's result rows (latency percentiles, failures by class, images per GPU) and a small
sample of results to read. A run of four shards thus reports four separate truths, not one sum."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from imgpipe_dagster.store.work import shard_state_counts

# Characters of the caption (or of the model's raw text) shown per sample row.
SAMPLE_TEXT_CHARS = 120
# Each shard's results under the analysis version the shard is bound to (older versions' rows are kept
# beside them; docs/VERSIONS.md).
RESULTS_QUERY = sql.SQL(
    "SELECT r.url, r.status, r.bytes, r.width, r.height, r.analysis->>'caption' AS caption, r.model_text,"
    " r.error_class, r.analysis_version FROM url_analysis_results r JOIN shards s USING (shard_id)"
    " WHERE r.analysis_version = coalesce(s.analysis_version, 'unversioned'){where} ORDER BY r.shard_id, r.url;"
)


@dataclass(frozen=True)
class ShardFigures:
    shard_id: str
    state_counts: dict[str, int]  # every URL of the shard, by state, after the run
    results_written: int  # result rows this run wrote for the shard
    failed_written: int
    failures_by_class: dict[str, int] = field(default_factory=dict)  # this run's failed rows
    images_by_gpu: dict[str, int] = field(default_factory=dict)  # this run's analysed rows
    download_ms_p50: float | None = None
    download_ms_p95: float | None = None
    inference_ms_p50: float | None = None
    inference_ms_p95: float | None = None

    @property
    def urls_total(self) -> int:
        return sum(self.state_counts.values())

    @property
    def urls_unfinished(self) -> int:
        return sum(self.state_counts.get(s, 0) for s in ("pending", "leased", "failed_retryable"))

    @property
    def failure_ratio(self) -> float:
        """Failed for good over finished, across all the shard's URLs."""
        failed = self.state_counts.get("failed_permanent", 0)
        finished = self.state_counts.get("done", 0) + failed
        return failed / finished if finished else 0.0


@dataclass(frozen=True)
class ResultSample:
    url: str
    status: str
    bytes: int | None
    width: int | None
    height: int | None
    text: str  # the caption if the analysis parsed, else the start of the model's text
    error_class: str | None


def shard_figures(conn: psycopg.Connection, shard_ids: Sequence[str], run_id: str) -> dict[str, ShardFigures]:
    """Each shard's figures; the result-row figures count only rows written by ``run_id``."""
    rows = conn.execute(
        "SELECT shard_id, count(*), count(*) FILTER (WHERE status <> 'ok'),"
        " percentile_disc(0.5) WITHIN GROUP (ORDER BY download_ms),"
        " percentile_disc(0.95) WITHIN GROUP (ORDER BY download_ms),"
        " percentile_disc(0.5) WITHIN GROUP (ORDER BY inference_ms),"
        " percentile_disc(0.95) WITHIN GROUP (ORDER BY inference_ms)"
        " FROM url_analysis_results WHERE shard_id = ANY(%s) AND run_id = %s GROUP BY 1",
        (list(shard_ids), run_id),
    ).fetchall()
    written = {row[0]: row[1:] for row in rows}
    failures: dict[str, dict[str, int]] = {}
    for shard, error_class, n in conn.execute(
        "SELECT shard_id, coalesce(error_class, 'unknown'), count(*) FROM url_analysis_results"
        " WHERE shard_id = ANY(%s) AND run_id = %s AND status <> 'ok' GROUP BY 1, 2 ORDER BY 3 DESC",
        (list(shard_ids), run_id),
    ):
        failures.setdefault(shard, {})[error_class] = n
    gpus: dict[str, dict[str, int]] = {}
    for shard, gpu, n in conn.execute(
        "SELECT shard_id, gpu, count(*) FROM url_analysis_results"
        " WHERE shard_id = ANY(%s) AND run_id = %s AND status = 'ok' AND gpu IS NOT NULL GROUP BY 1, 2 ORDER BY 2",
        (list(shard_ids), run_id),
    ):
        gpus.setdefault(shard, {})[gpu] = n
    figures = {}
    for shard in shard_ids:
        total, failed, dl50, dl95, inf50, inf95 = written.get(shard, (0, 0, None, None, None, None))
        figures[shard] = ShardFigures(
            shard_id=shard, state_counts=shard_state_counts(conn, [shard]), results_written=total,
            failed_written=failed, failures_by_class=failures.get(shard, {}), images_by_gpu=gpus.get(shard, {}),
            download_ms_p50=dl50, download_ms_p95=dl95, inference_ms_p50=inf50, inference_ms_p95=inf95,
        )  # fmt: skip
    return figures


def results_sample(
    conn: psycopg.Connection, shard_id: str, analysis_version: str | None = None, analysed: int = 8, failed: int = 4
) -> list[ResultSample]:
    """A few analysed and a few failed results of a shard (the first by URL) under ``analysis_version``
    (every version when None), for a person to read."""
    rows = conn.execute(
        "SELECT url, status, bytes, width, height,"
        " left(coalesce(analysis->>'caption', model_text, ''), %(chars)s), error_class FROM ("
        "   SELECT r.*, row_number() OVER (PARTITION BY status = 'ok' ORDER BY url) AS n"
        "     FROM url_analysis_results r WHERE shard_id = %(shard)s"
        "      AND (%(version)s::text IS NULL OR analysis_version = %(version)s)) s"
        " WHERE (status = 'ok' AND n <= %(analysed)s) OR (status <> 'ok' AND n <= %(failed)s)"
        " ORDER BY status = 'ok' DESC, url",
        {"shard": shard_id, "version": analysis_version, "analysed": analysed, "failed": failed,
         "chars": SAMPLE_TEXT_CHARS},
    ).fetchall()
    return [ResultSample(*row) for row in rows]


def results_query(shard_id: str | None = None) -> str:
    """The SQL that lists every result (of one shard, or of the corpus), for psql or `imgpipe` users."""
    if shard_id is None:
        return RESULTS_QUERY.format(where=sql.SQL("")).as_string(None)
    return RESULTS_QUERY.format(where=sql.SQL(" AND r.shard_id = {}").format(sql.Literal(shard_id))).as_string(None)
