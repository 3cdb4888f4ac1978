"""The invariant that nothing was lost: every URL in exactly one final state, with exactly the
result row that state implies. Used by the completeness asset check and by `imgpipe verify`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg

# (URL state, result status) pairs that are consistent; None = no result row.
_CONSISTENT = {("done", "ok"), ("failed_permanent", "failed")}
_UNFINISHED = {("pending", None), ("leased", None), ("failed_retryable", None)}


@dataclass
class VerifyReport:
    urls: int = 0
    final: int = 0
    unfinished: dict[str, int] = field(default_factory=dict)
    inconsistent: dict[str, int] = field(default_factory=dict)  # "state/result" -> URLs
    orphan_results: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing inconsistent or orphaned (unfinished URLs are allowed while work is under way)."""
        return not self.inconsistent and not self.orphan_results

    @property
    def complete(self) -> bool:
        return self.ok and not self.unfinished

    def lines(self) -> list[str]:
        out = [f"URLs: {self.urls}, in a final state: {self.final}"]
        if self.unfinished:
            out.append("not final yet: " + ", ".join(f"{k}={v}" for k, v in sorted(self.unfinished.items())))
        for pair, n in sorted(self.inconsistent.items()):
            out.append(f"INCONSISTENT {pair}: {n} URLs")
        if self.orphan_results:
            out.append(f"INCONSISTENT result rows without a corpus URL: {self.orphan_results}")
        out.extend(f"  e.g. {example}" for example in self.examples)
        out.append("OK" if self.complete else ("OK so far (work under way)" if self.ok else "FAILED"))
        return out


def verify(conn: psycopg.Connection, shard_ids: Sequence[str] | None = None, examples: int = 5) -> VerifyReport:
    where, params = ("WHERE c.shard_id = ANY(%(shards)s)", {"shards": list(shard_ids)}) if shard_ids else ("", {})
    rows = conn.execute(
        f"SELECT c.state::text, r.status, count(*) FROM corpus_urls c "  # noqa: S608 - fixed fragments only
        f"LEFT JOIN url_analysis_results r ON r.url_hash = c.url_hash {where} GROUP BY 1, 2",
        params,
    ).fetchall()
    report = VerifyReport()
    for state, status, n in rows:
        report.urls += n
        if (state, status) in _CONSISTENT:
            report.final += n
        elif (state, status) in _UNFINISHED:
            report.unfinished[state] = report.unfinished.get(state, 0) + n
        else:
            report.inconsistent[f"{state}/{status or 'no result row'}"] = n
    orphan_where = "AND r.shard_id = ANY(%(shards)s)" if shard_ids else ""
    report.orphan_results = conn.execute(
        "SELECT count(*) FROM url_analysis_results r WHERE NOT EXISTS "  # noqa: S608
        f"(SELECT 1 FROM corpus_urls c WHERE c.url_hash = r.url_hash) {orphan_where}",
        params,
    ).fetchone()[0]
    if report.inconsistent:
        bad = conn.execute(
            "SELECT c.url, c.state::text, r.status FROM corpus_urls c "  # noqa: S608
            f"LEFT JOIN url_analysis_results r ON r.url_hash = c.url_hash {where} "
            # coalesce: a missing result row (NULL status) must compare false, not unknown
            f"{'AND' if where else 'WHERE'} NOT ((c.state = 'done' AND coalesce(r.status, '') = 'ok') "
            "OR (c.state = 'failed_permanent' AND coalesce(r.status, '') = 'failed') "
            "OR (c.state IN ('pending', 'leased', 'failed_retryable') AND r.status IS NULL)) LIMIT %(n)s",
            {**params, "n": examples},
        ).fetchall()
        report.examples = [f"{url}: state {state}, result {status or 'missing'}" for url, state, status in bad]
    return report
