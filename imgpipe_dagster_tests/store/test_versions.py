"""Results per analysis version on a real PostgreSQL: rebinding a shard keeps the old rows, sets each
URL's state from its row under the new version, and never lets two runs of different versions write one
shard's URLs; verify answers for the version it is asked about."""

from __future__ import annotations

import pytest

from imgpipe_dagster.store import versions, work
from imgpipe_dagster.store.results import RESULT_FIELDS, stream_results
from imgpipe_dagster.store.shard_report import results_query, results_sample
from imgpipe_dagster.store.verify import NOT_ANALYSED, verify
from imgpipe_dagster.store.work import UrlOutcome
from imgpipe_dagster_tests.support import seed_corpus

SHARD = "s000001"
URLS = [f"https://example.org/{n}.jpg" for n in range(4)]
A, B = "analysis_v1:aaaaaaaaaaaa", "caption_short_v1:bbbbbbbbbbbb"


def analyse(conn, owner: str, version: str, fail: set[str] = frozenset()) -> tuple[int, int]:
    """One run's pass over the shard under ``version``: every claimable URL done (or failed if in ``fail``)."""
    versions.bind_shards(conn, [SHARD], version, owner)
    claimed = work.claim(conn, owner, [SHARD], 100, 60, version)
    outcomes = [
        UrlOutcome(c.url_hash, c.url, c.shard_id, "failed_permanent" if c.url in fail else "done", 1,
                   error_class="http_404" if c.url in fail else None,
                   result={"model_text": f"{version} says {c.url}", "sha256": c.url[-5:]})
        for c in claimed
    ]  # fmt: skip
    return work.write_outcomes(conn, owner, outcomes, version)


@pytest.fixture
def shard(conn):
    seed_corpus(conn, {SHARD: URLS})
    return SHARD


def rows(conn, version: str) -> dict[str, tuple[str, str]]:
    return {url: (status, text) for url, status, text in conn.execute(
        "SELECT url, status, model_text FROM url_analysis_results WHERE analysis_version = %s", (version,))}  # fmt: skip


def test_new_version_keeps_old_rows_and_analyses_each_url_once(conn, shard):
    assert analyse(conn, "run-a", A, fail={URLS[3]}) == (4, 4)
    assert verify(conn, [shard], analysis_version=A).complete

    assert analyse(conn, "run-b", B) == (4, 4)
    assert versions.shard_versions(conn, [shard]) == {shard: B}
    old, new = rows(conn, A), rows(conn, B)
    assert old[URLS[0]] == ("ok", f"{A} says {URLS[0]}") and old[URLS[3]][0] == "failed"
    assert {status for status, _ in new.values()} == {"ok"}
    for version in (A, B):
        report = verify(conn, [shard], analysis_version=version)
        assert report.complete and report.final == 4, report.lines()

    # back to A: every URL already has its A row, so nothing is claimable and nothing is written twice
    versions.bind_shards(conn, [shard], A, "run-c")
    assert work.claim(conn, "run-c", [shard], 100, 60, A) == []
    states = dict(conn.execute("SELECT url, state::text FROM corpus_urls").fetchall())
    assert states == {URLS[0]: "done", URLS[1]: "done", URLS[2]: "done", URLS[3]: "failed_permanent"}
    assert conn.execute("SELECT count(*) FROM url_analysis_results").fetchone()[0] == 8
    assert verify(conn, [shard]).complete  # the bound version (A) by default


def test_a_version_not_run_yet_reads_as_not_analysed(conn, shard):
    analyse(conn, "run-a", A)
    report = verify(conn, [shard], analysis_version=B)
    assert report.ok and not report.complete
    assert report.unfinished == {NOT_ANALYSED: 4}


def test_rebind_refused_while_another_live_run_holds_leases(conn, shard):
    versions.bind_shards(conn, [shard], A, "run-a")
    assert len(work.claim(conn, "run-a", [shard], 2, 60, A)) == 2
    with pytest.raises(versions.ShardBusyError, match=f"shard {SHARD} is being analysed under version {A} by run run-a"):
        versions.bind_shards(conn, [shard], B, "run-b")
    assert versions.shard_versions(conn, [shard]) == {shard: A}
    # a run of the other version claims nothing of a shard bound to A
    assert work.claim(conn, "run-b", [shard], 100, 60, B) == []


def test_dead_runs_late_write_is_dropped_after_a_rebind(conn, shard):
    versions.bind_shards(conn, [shard], A, "run-a")
    claimed = work.claim(conn, "run-a", [shard], 100, 60, A)
    conn.execute("UPDATE corpus_urls SET lease_expires_at = now() - interval '1 second'")  # run-a died
    conn.commit()
    assert analyse(conn, "run-b", B) == (4, 4)
    late = [UrlOutcome(c.url_hash, c.url, c.shard_id, "done", 1, result={"model_text": "late"}) for c in claimed]
    assert work.write_outcomes(conn, "run-a", late, A) == (0, 0)
    assert rows(conn, A) == {}
    assert verify(conn, [shard], analysis_version=B).complete


def test_rows_written_before_versions_are_adopted_by_the_first_versioned_run(conn, shard):
    claimed = work.claim(conn, "old-run", [shard], 100, 60)
    work.write_outcomes(conn, "old-run", [UrlOutcome(c.url_hash, c.url, c.shard_id, "done", 1) for c in claimed])
    assert verify(conn, [shard], analysis_version=A).complete  # an unbound shard answers for any version

    assert analyse(conn, "run-a", A) == (0, 0)  # adopted: nothing analysed again
    assert len(rows(conn, A)) == 4 and rows(conn, versions.UNVERSIONED) == {}
    assert verify(conn, [shard], analysis_version=A).complete


def test_results_of_a_shard_are_read_per_version(conn, shard):
    analyse(conn, "run-a", A)
    analyse(conn, "run-b", B)
    version_at = RESULT_FIELDS.index("analysis_version")
    bound = [row for batch in stream_results(conn, [shard]) for row in batch]
    old = [row for batch in stream_results(conn, [shard], analysis_version=A) for row in batch]
    assert {r[version_at] for r in bound} == {B} and len(bound) == 4
    assert {r[version_at] for r in old} == {A} and len(old) == 4
    assert versions.versions_of_shards(conn, [shard]) == {A: {"ok": 4}, B: {"ok": 4}}


def test_the_results_query_shown_in_the_ui_lists_the_bound_versions_rows(conn, shard):
    analyse(conn, "run-a", A, fail={URLS[3]})
    analyse(conn, "run-b", B)
    for query in (results_query(shard), results_query()):
        listed = conn.execute(query).fetchall()
        assert sorted(row[0] for row in listed) == sorted(URLS) and {row[-1] for row in listed} == {B}
    # a sample a person reads in the UI is of one version too
    assert {row.url for row in results_sample(conn, shard, A)} == set(URLS)
    assert {row.error_class for row in results_sample(conn, shard, A)} == {None, "http_404"}
    assert {row.error_class for row in results_sample(conn, shard, B)} == {None}


def test_imgpipe_verify_checks_the_configured_version_unless_told(conn, shard, database_url, monkeypatch, capsys):
    from imgpipe_dagster import cli
    from imgpipe_dagster.store import database as db
    from imgpipe_dagster.versioning import configured_analysis_version

    monkeypatch.setenv(db.DATABASE_URL_ENV, database_url)
    monkeypatch.delenv("IMGPIPE_PROMPT", raising=False)
    current = configured_analysis_version().label
    analyse(conn, "run-a", current)
    analyse(conn, "run-b", B)  # the shard is now bound to B; the current version's rows stay

    assert cli.main(["verify", "--require-complete"]) == 0
    assert f"analysis version: {current}" in capsys.readouterr().out
    assert cli.main(["verify", "--require-complete", "--analysis-version", "bound"]) == 0
    capsys.readouterr()
    assert cli.main(["verify", "--require-complete", "--analysis-version", "caption_short_v1:000000000000"]) == 1
    assert f"{NOT_ANALYSED}=4" in capsys.readouterr().out


def test_near_duplicates_are_counted_not_merged(conn, shard):
    versions.bind_shards(conn, [shard], A, "run-a")
    claimed = work.claim(conn, "run-a", [shard], 100, 60, A)
    # two re-encodings of one picture (same perceptual hash, other bytes), one reuse of exact bytes, one other
    columns = [{"sha256": "s1", "phash": 42}, {"sha256": "s2", "phash": 42},
               {"sha256": "s1", "phash": 42, "reused_from": claimed[0].url_hash}, {"sha256": "s3", "phash": 7}]  # fmt: skip
    work.write_outcomes(conn, "run-a", [UrlOutcome(c.url_hash, c.url, c.shard_id, "done", 1, result=r)
                                        for c, r in zip(claimed, columns, strict=True)], A)  # fmt: skip
    assert versions.duplicate_counts(conn, shard, A) == versions.DuplicateCounts(reused=1, near_duplicates=3)
    assert versions.duplicate_counts(conn, shard, B) == versions.DuplicateCounts(reused=0, near_duplicates=0)
    found = versions.find_reusable(conn, A, ["s1", "s3", "s9"])
    assert set(found) == {"s1", "s3"} and found["s1"].source_url_hash == claimed[0].url_hash
    assert versions.find_reusable(conn, B, ["s1"]) == {}
