"""The invariant that nothing was lost: every URL in exactly one final state, with exactly the
result row that state implies. Used by the completeness asset check and by `imgpipe verify`.

Checked for one analysis version (store/versions.py): on a shard bound to that version, the URL's
state and its row under the version must agree; on a shard bound to another version, the states belong
to that one, so a URL is final here when it has a row under the version, and not analysed otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg

from imgpipe_dagster.store.versions import UNVERSIONED

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


# state of the URLs of a shard bound to another version that have no row under the one verified
NOT_ANALYSED = "not_analysed_in_version"

# The results under the version verified: the one named, else each shard's own. A shard no versioned
# run took yet holds unversioned rows, which the first run of any version adopts (store/versions.py).
_VERSION_JOIN = (
    "JOIN shards s ON s.shard_id = c.shard_id "
    "LEFT JOIN url_analysis_results r ON r.url_hash = c.url_hash AND r.analysis_version = "
    "CASE WHEN s.analysis_version IS NULL THEN %(unversioned)s ELSE coalesce(%(version)s, s.analysis_version) END "
)
_BOUND = "(s.analysis_version IS NULL OR s.analysis_version = coalesce(%(version)s, s.analysis_version))"


def verify(
    conn: psycopg.Connection, shard_ids: Sequence[str] | None = None, examples: int = 5,
    analysis_version: str | None = None,
) -> VerifyReport:
    """The report for ``analysis_version`` (None: the version each shard is bound to)."""
    where, params = ("WHERE c.shard_id = ANY(%(shards)s)", {"shards": list(shard_ids)}) if shard_ids else ("", {})
    params |= {"version": analysis_version, "unversioned": UNVERSIONED}
    rows = conn.execute(
        f"SELECT {_BOUND}, c.state::text, r.status, count(*) FROM corpus_urls c "  # noqa: S608 - fixed fragments only
        f"{_VERSION_JOIN} {where} GROUP BY 1, 2, 3",
        params,
    ).fetchall()
    report = VerifyReport()
    for bound, state, status, n in rows:
        report.urls += n
        if not bound:  # the states belong to another version: only the rows under this one count
            if status in ("ok", "failed"):
                report.final += n
            else:
                report.unfinished[NOT_ANALYSED] = report.unfinished.get(NOT_ANALYSED, 0) + n
        elif (state, status) in _CONSISTENT:
            report.final += n
        elif (state, status) in _UNFINISHED:
            report.unfinished[state] = report.unfinished.get(state, 0) + n
        else:
            report.inconsistent[f"{state}/{status or 'no result row'}"] = n
    orphan_where = "AND r.shard_id = ANY(%(shards)s)" if shard_ids else ""
    # a row without its URL is wrong under any version
    report.orphan_results = conn.execute(
        "SELECT count(*) FROM url_analysis_results r WHERE NOT EXISTS "  # noqa: S608
        f"(SELECT 1 FROM corpus_urls c WHERE c.url_hash = r.url_hash) {orphan_where}",
        params,
    ).fetchone()[0]
    if report.inconsistent:
        bad = conn.execute(
            "SELECT c.url, c.state::text, r.status FROM corpus_urls c "  # noqa: S608
            f"{_VERSION_JOIN} {where} "
            # coalesce: a missing result row (NULL status) must compare false, not unknown
            f"{'AND' if where else 'WHERE'} {_BOUND} AND NOT ((c.state = 'done' AND coalesce(r.status, '') = 'ok') "
            "OR (c.state = 'failed_permanent' AND coalesce(r.status, '') = 'failed') "
            "OR (c.state IN ('pending', 'leased', 'failed_retryable') AND r.status IS NULL)) LIMIT %(n)s",
            {**params, "n": examples},
        ).fetchall()
        report.examples = [f"{url}: state {state}, result {status or 'missing'}" for url, state, status in bad]
    return report
