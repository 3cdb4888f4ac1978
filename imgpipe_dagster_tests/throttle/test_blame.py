"""The throttle tells the web's failures from ours: outcomes written the engine's way into a real
PostgreSQL, read back by the throttle's window query, decided on."""

from __future__ import annotations

from imgpipe_dagster.store.work import UrlOutcome, claim, write_outcomes
from imgpipe_dagster.throttle import blame
from imgpipe_dagster.throttle.decide import (
    Backlog,
    GpuHealth,
    ThrottleSettings,
    ThrottleState,
    TickInputs,
    decide,
)
from imgpipe_dagster.throttle.queries import read_window
from imgpipe_dagster_tests.support import seed_corpus

SETTINGS = ThrottleSettings(healthy_period_s=600, min_dwell_s=120, pause_min_s=300)
GPU_UP = (GpuHealth("http://127.0.0.1:8000", reachable=True, status="ready", queue_size=0, queue_capacity=100),)
HOSTS = 32
URLS = 1000


def url_of(n: int) -> str:
    return f"http://img{n % HOSTS}.example/{n}.jpg"


def write_window(conn, failure_of) -> None:
    """One shard of URLS URLs over HOSTS hosts; ``failure_of(n)`` is (state, error_class) or None for done."""
    seed_corpus(conn, {"s000001": [url_of(n) for n in range(URLS)]})
    claimed = claim(conn, "run-a", ["s000001"], URLS, 60)
    outcomes = []
    for c in claimed:
        failure = failure_of(int(c.url.rsplit("/", 1)[1].split(".")[0]))
        if failure is None:
            outcomes.append(UrlOutcome(c.url_hash, c.url, c.shard_id, "done", 1, result={"download_ms": 300.0}))
        else:
            state, error_class = failure
            outcomes.append(UrlOutcome(c.url_hash, c.url, c.shard_id, state, 1, error_class, error_class,
                                       result={"download_ms": 10_000.0}))  # fmt: skip
    write_outcomes(conn, "run-a", outcomes)


def tick(conn, profile="aggressive"):
    window = read_window(conn, SETTINGS.window_s, SETTINGS.window_max_rows)
    inputs = TickInputs(now=0, window=window, gpus=GPU_UP, runs_in_flight=0,
                        backlog=Backlog(shards_with_work=1, urls_unfinished=0, candidates=()))  # fmt: skip
    return window, decide(inputs, ThrottleState(profile=profile), SETTINGS)


def realistic_failure(n: int):
    """About 22% of URLs failing by the web's fault, as bench/web.py's realistic web does."""
    host = n % HOSTS
    if host in (3, 17):
        return "failed_permanent", "connect_refused"  # dead hosts
    if host == 9:
        return "failed_retryable", "deadline"  # a hanging host
    if host == 25:
        return "failed_permanent", "too_slow"  # a trickling host
    if host == 30:
        return "failed_retryable", "reset"
    if n % 17 == 0:
        return "failed_permanent", "http_404"
    if host == 5 and n % 3 == 0:
        return "failed_permanent", "robots_disallowed"
    return None


def test_a_realistic_web_neither_steps_down_nor_pauses(conn):
    write_window(conn, realistic_failure)
    window, decision = tick(conn)
    assert 0.20 <= (window.failed + window.retryable) / window.samples <= 0.25
    assert window.web_failure_ratio >= 0.20 and window.failure_ratio == 0.0
    assert decision.action not in ("step_down", "pause")
    assert decision.profile == "aggressive" and not decision.paused


def test_every_host_refusing_at_once_is_our_network_and_pauses(conn):
    write_window(conn, lambda n: ("failed_retryable", "connect_refused"))
    window, decision = tick(conn)
    assert window.hosts == window.hosts_failing == HOSTS
    assert decision.action == "pause" and decision.paused


def test_dns_failing_for_most_hosts_steps_down(conn):
    # 28 of 32 hosts fail to resolve: only 4 hosts answer at all
    write_window(conn, lambda n: ("failed_retryable", "dns_failure") if n % HOSTS >= 4 else None)
    window, decision = tick(conn)
    assert window.failure_ratio > SETTINGS.step_down_failure_ratio
    assert decision.action == "step_down" and decision.profile == "medium"


def test_gpu_errors_step_down_even_when_the_web_is_fine(conn):
    write_window(conn, lambda n: ("failed_retryable", "inference_error") if n % 4 == 0 else None)
    window, decision = tick(conn)
    assert window.web_failed == 0 and window.failure_ratio >= 0.25
    assert decision.action == "step_down"


def test_every_class_has_one_side():
    assert not blame.WEB_SIDE & blame.EITHER
    assert blame.TIMEOUTS <= blame.EITHER
    assert blame.side("http_404") == "web" and blame.side("connect_refused") == "either"
    assert blame.side("inference_error") == "ours" and blame.side(None) == "ours"
