"""A run's tail held by a few slow hosts goes back to the pool (engine/tail.py), and a later run finishes
it; a tail that is the run's own backlog never does. The rule on its own with a clock of our own, then
two real runs: loopback hosts, a tiny-model GPU server on the CPU, a real PostgreSQL."""

from __future__ import annotations

import time
from dataclasses import replace

from imgpipe_dagster.engine.runner import ShardRunner
from imgpipe_dagster.engine.tail import TailWatch
from imgpipe_dagster.profiles import resolve
from imgpipe_dagster.settings_map import engine_settings, medium_fetch_settings
from imgpipe_dagster.store import work
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster_tests.engine.conftest import LoggedHost
from imgpipe_dagster_tests.support import seed_corpus

SHARD = "s000001"
FAST, SLOW = "http://fast:80", "http://slow:80"


def watch_after_fast_pass(fast_urls: int, slow_urls: int) -> TailWatch:
    """100 s of a run: every fast host URL through at 1/s, the slow host's URLs all still held."""
    watch = TailWatch(window_s=5.0, slow_share=0.25, host_share=0.5, started_at=0.0)
    for n in range(slow_urls):
        watch.claimed(b"s%d" % n, SLOW)
    for n in range(fast_urls):
        watch.claimed(b"f%d" % n, FAST)
        watch.left(b"f%d" % n, FAST, through=True, due_at=None)
        watch.hand_back_reason(n * 100 / fast_urls, wait_for_s=2.0)
    watch.fresh_ran_out(100.0)
    return watch


def test_a_few_slow_hosts_hand_back_their_tail():
    watch = watch_after_fast_pass(fast_urls=90, slow_urls=10)
    assert watch.hand_back_reason(102.0, wait_for_s=2.0) is None  # not a whole window yet
    watch.left(b"s0", SLOW, through=True, due_at=None)  # 1 URL in 6 s: far under the run's pace
    reason = watch.hand_back_reason(106.0, wait_for_s=2.0)
    assert reason is not None and "9 URLs of 1 hosts" in reason


def test_a_tail_that_is_the_runs_own_backlog_is_finished():
    watch = watch_after_fast_pass(fast_urls=40, slow_urls=60)  # the slow host is most of the run
    watch.hand_back_reason(102.0, wait_for_s=2.0)
    watch.left(b"s0", SLOW, through=True, due_at=None)
    assert watch.hand_back_reason(106.0, wait_for_s=2.0) is None


def test_a_tail_that_keeps_the_runs_pace_is_finished():
    watch = watch_after_fast_pass(fast_urls=90, slow_urls=10)
    for n, at in enumerate((101.0, 102.0, 103.0, 104.0, 105.0, 106.0)):
        watch.left(b"s%d" % n, SLOW, through=True, due_at=None)  # 1/s, as fast as the run went
        assert watch.hand_back_reason(at, wait_for_s=2.0) is None


def test_urls_put_back_due_soon_are_part_of_the_tail():
    watch = watch_after_fast_pass(fast_urls=90, slow_urls=2)
    watch.hand_back_reason(101.0, wait_for_s=2.0)
    watch.left(b"s0", SLOW, through=False, due_at=107.0)  # a 429 pause: the run would wait for it
    watch.left(b"s1", SLOW, through=False, due_at=200.0)  # due long after: left to a later run anyway
    assert watch.left_over(106.0, wait_for_s=2.0) == {SLOW: 1}
    watch.claimed(b"s0", SLOW)  # claimed again: held, no longer waiting in the pool
    assert watch.left_over(106.0, wait_for_s=2.0) == {SLOW: 1}


def tail_settings():
    worker, _ = resolve("medium", {"images_per_request": 8, "max_concurrent_batches": 2, "lease_seconds": 30,
                                   "image_resize_threads": 1})  # fmt: skip
    # two requests at a time per host: the slow host's 16 URLs need 12 s, the fast host's are done in a few
    fetch = medium_fetch_settings(allowed_networks=["127.0.0.0/8"], image_resize_threads=1, target_pixels=56 * 56,
                                  patch_multiple=28, per_host_limit=2)  # fmt: skip
    settings = engine_settings(worker, fetch, prompt_name="caption_short_v1")
    # a short window, and a tail handed back comes due after a few seconds
    return replace(settings, run=replace(settings.run, tail_window_s=1.0, host_deferral_s=3.0))


def test_a_slow_hosts_tail_goes_back_to_the_pool_and_a_later_run_finishes_it(conn, database_url, gpu_endpoint,
                                                                              imgpipe_home):  # fmt: skip
    settings = tail_settings()
    with LoggedHost() as fast, LoggedHost(delay_s=1.5) as slow:
        fast_urls = [fast.url(f"/ok/{n}.jpg") for n in range(60)]
        slow_urls = [slow.url(f"/ok/{n}.jpg") for n in range(16)]
        seed_corpus(conn, {SHARD: fast_urls + slow_urls})

        first = ShardRunner(database_url, "run-tail-1", [SHARD], settings, [gpu_endpoint],
                            progress=lambda line, summary: None).run()  # fmt: skip
        states = dict(conn.execute("SELECT url, state::text FROM corpus_urls").fetchall())
        handed_back = conn.execute(
            "SELECT url, attempts, next_attempt_at IS NOT NULL FROM corpus_urls WHERE state = 'pending'"
        ).fetchall()
        conn.commit()
        deadline = time.monotonic() + 60
        while work.leftover(conn, [SHARD]).claimable == 0:  # a later run, once the tail is due
            conn.rollback()  # now() is the transaction's start: each look needs a new one
            assert time.monotonic() < deadline, "the tail handed back never came due"
            time.sleep(0.2)
        conn.rollback()

        second = ShardRunner(database_url, "run-tail-2", [SHARD], settings, [gpu_endpoint],
                             progress=lambda line, summary: None).run()  # fmt: skip

    assert first.downloads["tail_handed_back"] == len(handed_back) > 0, first.downloads
    assert all(states[url] == "done" for url in fast_urls)
    # only the slow host's URLs went back, waiting for a due time, no attempt spent
    assert {url for url, _, _ in handed_back} <= set(slow_urls)
    assert all(attempts == 0 and due for _, attempts, due in handed_back)
    assert first.urls_waiting_for_retry == len(handed_back)
    # the later run's tail is its whole backlog: it finishes it
    assert second.downloads["tail_handed_back"] == 0
    assert second.final_count("done") == len(fast_urls) + len(slow_urls)
    assert verify(conn, [SHARD]).complete
