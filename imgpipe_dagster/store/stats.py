"""Progress queries over the corpus and results, cheap enough to run every sensor tick on 20M URLs:
they read the unfinished part through its partial index and recent results through created_at."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import psycopg


@dataclass
class Progress:
    urls_total: int = 0
    urls_by_state: dict[str, int] = field(default_factory=dict)
    shards_total: int = 0
    shards_unfinished: int = 0
    rate_10m_per_s: float = 0.0
    rate_1h_per_s: float = 0.0
    failed_10m: int = 0
    processed_10m: int = 0
    eta_s: float | None = None
    per_minute: list[tuple[str, int, int]] = field(default_factory=list)  # (minute, ok, failed), last 10 min
    top_errors_24h: list[tuple[str, int]] = field(default_factory=list)
    per_gpu_10m: dict[str, float] = field(default_factory=dict)  # images/s

    @property
    def urls_unfinished(self) -> int:
        return sum(self.urls_by_state.get(s, 0) for s in ("pending", "leased", "failed_retryable"))

    def as_dict(self) -> dict:
        return asdict(self) | {"urls_unfinished": self.urls_unfinished}


def progress(conn: psycopg.Connection) -> Progress:
    p = Progress()
    p.urls_total = conn.execute("SELECT coalesce(sum(url_count), 0) FROM shards").fetchone()[0]
    p.shards_total = conn.execute("SELECT count(*) FROM shards").fetchone()[0]
    unfinished = dict(
        conn.execute(
            "SELECT state::text, count(*) FROM corpus_urls"
            " WHERE state IN ('pending', 'leased', 'failed_retryable') GROUP BY 1"
        ).fetchall()
    )
    failed = conn.execute("SELECT count(*) FROM corpus_urls WHERE state = 'failed_permanent'").fetchone()[0]
    p.urls_by_state = {s: unfinished.get(s, 0) for s in ("pending", "leased", "failed_retryable")}
    p.urls_by_state["failed_permanent"] = failed
    p.urls_by_state["done"] = p.urls_total - sum(unfinished.values()) - failed
    p.shards_unfinished = conn.execute(
        "SELECT count(DISTINCT shard_id) FROM corpus_urls WHERE state IN ('pending', 'leased', 'failed_retryable')"
    ).fetchone()[0]
    processed_1h, processed_10m, failed_10m = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE created_at > now() - interval '10 minutes'),"
        " count(*) FILTER (WHERE created_at > now() - interval '10 minutes' AND status <> 'ok')"
        " FROM url_analysis_results WHERE created_at > now() - interval '1 hour'"
    ).fetchone()
    p.processed_10m, p.failed_10m = processed_10m, failed_10m
    p.rate_10m_per_s = processed_10m / 600
    p.rate_1h_per_s = processed_1h / 3600
    rate = p.rate_10m_per_s or p.rate_1h_per_s
    p.eta_s = p.urls_unfinished / rate if rate > 0 else None
    p.per_minute = [
        (minute.strftime("%H:%M"), ok, failed)
        for minute, ok, failed in conn.execute(
            "SELECT minute, urls_ok, urls_failed FROM urls_processed_per_minute"
            " WHERE minute > now() - interval '10 minutes' ORDER BY minute"
        ).fetchall()
    ]
    p.top_errors_24h = conn.execute(
        "SELECT error_class, count(*) FROM url_analysis_results"
        " WHERE created_at > now() - interval '24 hours' AND status <> 'ok' GROUP BY 1 ORDER BY 2 DESC LIMIT 10"
    ).fetchall()
    p.per_gpu_10m = {
        gpu: n / 600
        for gpu, n in conn.execute(
            "SELECT gpu, count(*) FROM url_analysis_results"
            " WHERE created_at > now() - interval '10 minutes' AND gpu IS NOT NULL GROUP BY 1"
        ).fetchall()
    }
    return p


def throughput_series(conn: psycopg.Connection, hours: int = 24) -> list[tuple]:
    """(minute, ok, failed) per minute over the last ``hours`` hours, for the throughput plot."""
    return conn.execute(
        "SELECT date_trunc('minute', created_at) AS minute, count(*) FILTER (WHERE status = 'ok'),"
        " count(*) FILTER (WHERE status <> 'ok') FROM url_analysis_results"
        " WHERE created_at > now() - make_interval(hours => %s) GROUP BY 1 ORDER BY 1",
        (hours,),
    ).fetchall()


def failures_by_class(conn: psycopg.Connection) -> dict[str, int]:
    """URLs whose result is a failure, by error class (all time)."""
    return {
        str(error_class or "unknown"): int(n)
        for error_class, n in conn.execute(
            "SELECT error_class, count(*) FROM url_analysis_results WHERE status <> 'ok' GROUP BY 1"
        ).fetchall()
    }


@dataclass(frozen=True)
class ParseStats:
    """How the successful analyses of some shards read: as JSON, as free text, or not at all."""

    analyses: int  # successful results
    parsed_json: int  # of those, the model's text parsed as the JSON the prompt asks for
    empty: int  # of those, no text at all

    @property
    def parsed_share(self) -> float:
        return self.parsed_json / self.analyses if self.analyses else 1.0


def parse_stats(conn: psycopg.Connection, shard_ids: list[str], analysis_version: str | None = None) -> ParseStats:
    """Over the results under ``analysis_version`` (every version when None)."""
    analyses, parsed_json, empty = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE parse_ok), count(*) FILTER (WHERE coalesce(model_text, '') = '')"
        " FROM url_analysis_results WHERE shard_id = ANY(%s) AND status = 'ok'"
        " AND (%s::text IS NULL OR analysis_version = %s)",
        (shard_ids, analysis_version, analysis_version),
    ).fetchone()
    return ParseStats(analyses=analyses, parsed_json=parsed_json, empty=empty)
