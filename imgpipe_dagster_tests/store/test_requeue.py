"""Requeue of failed URLs in the store: what is selected, what a dry run leaves alone, what is kept,
and that the invariant of `imgpipe verify` holds before and after."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from imgpipe_dagster.store.requeue import RequeueFilter, UnknownErrorClassError, requeue, requeued_history
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster.store.work import UrlOutcome, claim, write_outcomes
from imgpipe_dagster_tests.support import seed_corpus

# url -> (next state, error class) the first run leaves it in
FIRST_RUN = {
    "http://down.test/a.jpg": ("failed_permanent", "http_5xx"),
    "http://down.test:8080/b.jpg": ("failed_permanent", "http_5xx"),
    "http://down.test/c.jpg": ("failed_retryable", "http_5xx"),
    "http://other.test/d.jpg": ("failed_permanent", "http_5xx"),
    "http://down.test/e.jpg": ("failed_permanent", "http_404"),
    "http://down.test/f.jpg": ("done", None),
    "http://down.test/g.jpg": ("failed_permanent", "ttfb_timeout"),
}
SHARDS = {"s1": list(FIRST_RUN)[:4], "s2": list(FIRST_RUN)[4:]}


@pytest.fixture
def failed(conn):
    seed_corpus(conn, SHARDS)
    claimed = claim(conn, "first-run", list(SHARDS), 100, 60)
    outcomes = []
    for url in claimed:
        state, error_class = FIRST_RUN[url.url]
        outcomes.append(UrlOutcome(url.url_hash, url.url, url.shard_id, state, 3, error_class,
                                   f"{error_class} happened" if error_class else None,
                                   next_attempt_at=datetime.now(UTC) + timedelta(hours=1) if state == "failed_retryable"
                                   else None, result={"http_status": 503 if error_class == "http_5xx" else 200}))  # fmt: skip
    write_outcomes(conn, "first-run", outcomes)
    return conn


def states(conn) -> dict[str, tuple]:
    return {url: (state, attempts, error) for url, state, attempts, error in conn.execute(
        "SELECT c.url, c.state::text, c.attempts, r.error_class FROM corpus_urls c"
        " LEFT JOIN url_analysis_results r USING (url_hash)").fetchall()}  # fmt: skip


def test_dry_run_counts_and_changes_nothing(failed):
    before = states(failed)
    report = requeue(failed, RequeueFilter(("http_5xx", "ttfb_timeout")), dry_run=True)
    assert report.urls_by_class == {"http_5xx": 4, "ttfb_timeout": 1}
    assert report.urls_by_state == {"failed_permanent": 4, "failed_retryable": 1}
    assert report.lines()[0] == "would requeue 5 URL(s) in 2 shard(s)"
    failed.commit()
    assert states(failed) == before
    assert failed.execute("SELECT count(*) FROM requeues").fetchone() == (0,)


def test_requeue_moves_failures_to_pending_keeps_them_and_is_idempotent(failed):
    report = requeue(failed, RequeueFilter(("http_5xx",)))
    assert report.urls_by_class == {"http_5xx": 4} and report.result_rows_removed == 3
    after = states(failed)
    for url in ("http://down.test/a.jpg", "http://down.test:8080/b.jpg", "http://down.test/c.jpg",
                "http://other.test/d.jpg"):  # fmt: skip
        assert after[url] == ("pending", 0, None)
    assert after["http://down.test/e.jpg"] == ("failed_permanent", 3, "http_404")
    assert after["http://down.test/f.jpg"][0] == "done"
    (due,) = failed.execute("SELECT count(*) FROM corpus_urls WHERE state = 'pending' AND next_attempt_at IS NOT NULL"
                            ).fetchone()  # fmt: skip
    assert due == 0  # claimable at once
    report_check = verify(failed)
    assert report_check.ok and report_check.unfinished == {"pending": 4}, report_check.lines()

    hashes = [h for (h,) in failed.execute("SELECT url_hash FROM corpus_urls WHERE state = 'pending'").fetchall()]
    history = requeued_history(failed, hashes)
    assert {url: (state, error) for _, url, state, error in history} == {
        "http://down.test/a.jpg": ("failed_permanent", "http_5xx"),
        "http://down.test:8080/b.jpg": ("failed_permanent", "http_5xx"),
        "http://down.test/c.jpg": ("failed_retryable", "http_5xx"),
        "http://other.test/d.jpg": ("failed_permanent", "http_5xx")}  # fmt: skip
    assert failed.execute("SELECT urls_by_class FROM requeues").fetchall() == [({"http_5xx": 4},)]

    again = requeue(failed, RequeueFilter(("http_5xx",)))
    assert again.urls == 0 and again.result_rows_removed == 0
    assert again.requeue_id is None and len(requeued_history(failed, hashes)) == 4  # nothing registered twice
    assert failed.execute("SELECT count(*) FROM requeues").fetchone() == (1,)


def test_filters_by_host_shard_and_time(failed):
    by_host = requeue(failed, RequeueFilter(("http_5xx",), host="DOWN.test"), dry_run=True)
    assert by_host.urls == 3  # every port of down.test, not other.test
    assert requeue(failed, RequeueFilter(("http_5xx",), host="down.test:8080"), dry_run=True).urls == 1
    assert requeue(failed, RequeueFilter(("http_5xx",), host="down_test"), dry_run=True).urls == 0
    assert requeue(failed, RequeueFilter(("http_5xx", "http_404"), shard_ids=("s2",)), dry_run=True).urls == 1
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert requeue(failed, RequeueFilter(("http_5xx",), failed_since=later), dry_run=True).urls == 0
    earlier = datetime.now(UTC) - timedelta(minutes=5)
    assert requeue(failed, RequeueFilter(("http_5xx",), failed_since=earlier), dry_run=True).urls == 4


def test_a_leased_url_is_never_requeued(failed):
    failed.execute("UPDATE corpus_urls SET state = 'leased', lease_owner = 'live-run',"
                   " lease_expires_at = now() + interval '1 minute' WHERE url = 'http://down.test/c.jpg'")  # fmt: skip
    failed.commit()
    assert requeue(failed, RequeueFilter(("http_5xx",))).urls == 3
    assert states(failed)["http://down.test/c.jpg"][0] == "leased"


def test_a_filter_without_an_error_class_is_refused():
    with pytest.raises(ValueError, match="at least one error class"):
        RequeueFilter(())
    with pytest.raises(ValueError, match="time zone"):
        RequeueFilter(("http_5xx",), failed_since=datetime(2026, 1, 1))


def test_a_class_no_url_failed_with_is_refused_unless_the_pipeline_knows_it(failed):
    with pytest.raises(UnknownErrorClassError, match="unknown error class 'http5xx'"):
        requeue(failed, RequeueFilter(("http5xx",)), dry_run=True)
    assert requeue(failed, RequeueFilter(("tls_error",)), dry_run=True).urls == 0  # known, none failed so
    failed.execute("UPDATE corpus_urls SET last_error_class = 'gpu_tier_x' WHERE url = 'http://down.test/a.jpg'")
    failed.commit()
    assert requeue(failed, RequeueFilter(("gpu_tier_x",)), dry_run=True).urls == 1  # a class some URL carries
