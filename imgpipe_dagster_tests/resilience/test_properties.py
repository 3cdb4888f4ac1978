"""Property-based checks of the invariants the limiter, breaker and retry budget promise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imgpipe_dagster.resilience import (
    AdaptiveLimiter,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    LimiterSettings,
    RetryPolicy,
)
from imgpipe_dagster.settings_map import profile_engine_settings
from imgpipe_dagster_tests.resilience.fakes import FakeClock
from imgpipe_dagster_tests.resilience.medium import medium_retry

profiles = st.sampled_from(["conservative", "medium", "aggressive"])
latencies = st.floats(min_value=0.0, max_value=200.0, allow_nan=False)
limiter_events = st.lists(
    st.one_of(
        st.tuples(st.just("success"), latencies),
        st.tuples(st.sampled_from(["429", "timeout", "error"]), latencies),
        st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=30.0)),
        st.tuples(st.just("take"), st.just(0.0)),
        st.tuples(st.just("release"), st.just(0.0)),
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(profile=profiles, events=limiter_events)
def test_limit_stays_within_bounds_and_never_increases_on_a_loss(profile, events):
    limiter_settings: LimiterSettings = profile_engine_settings(profile).limiter
    clock = FakeClock()
    limiter = AdaptiveLimiter("gpu0", limiter_settings, clock=clock)
    for kind, value in events:
        before = limiter.limit
        if kind == "success":
            limiter.record_success(value)
        elif kind == "advance":
            clock.advance(value)
        elif kind == "take":
            if limiter.try_acquire_nowait() is not None:
                assert limiter.in_flight <= limiter.effective_limit
        elif kind == "release":
            if limiter.in_flight:
                limiter.release()
        else:
            limiter.record_loss(kind, value)
            assert limiter.limit <= before
        assert limiter_settings.min_limit <= limiter.limit <= limiter_settings.max_limit


breaker_events = st.lists(
    st.one_of(
        st.just(("acquire",)),
        st.tuples(st.just("success"), st.integers(0, 50), latencies),
        st.tuples(st.just("failure"), st.integers(0, 50), st.sampled_from(["error", "timeout", "429"])),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=100.0)),
    ),
    max_size=300,
)
breaker_settings = st.builds(
    BreakerSettings,
    circuit_failure_threshold=st.integers(1, 20),
    circuit_success_threshold=st.integers(1, 5),
    circuit_timeout_seconds=st.floats(1.0, 60.0),
    circuit_half_open_probes=st.one_of(st.none(), st.integers(1, 4)),
    timeout_failure_weight=st.floats(1.0, 3.0),
)


@settings(max_examples=200, deadline=None)
@given(config=breaker_settings, events=breaker_events)
def test_half_open_never_admits_more_probes_than_configured(config, events):
    clock = FakeClock()
    breaker = CircuitBreaker("gpu0", config, clock=clock)
    outstanding = []
    for event in events:
        kind = event[0]
        if kind == "acquire":
            permit = breaker.try_acquire()
            if permit is not None:
                outstanding.append(permit)
        elif kind == "advance":
            clock.advance(event[1])
        elif outstanding:
            permit = outstanding.pop(event[1] % len(outstanding))
            if kind == "success":
                permit.success(event[2])
            elif kind == "failure":
                permit.failure(event[2])
            else:
                permit.cancel()
        if breaker.state is BreakerState.HALF_OPEN:
            live_probes = [p for p in outstanding if p.probe and p.generation == breaker._generation]
            assert len(live_probes) <= config.half_open_probes
            assert breaker.snapshot()["probes_in_flight"] == len(live_probes)


@settings(max_examples=200, deadline=None)
@given(
    config=breaker_settings,
    outcomes=st.data(),
)
def test_a_breaker_with_fewer_calls_than_the_minimum_never_opens(config, outcomes):
    calls = outcomes.draw(
        st.lists(
            st.tuples(st.sampled_from(["ok", "error", "timeout", "429"]), latencies),
            max_size=config.minimum_calls - 1,
        )
    )
    breaker = CircuitBreaker("gpu0", config, clock=FakeClock())
    for outcome, latency in calls:
        permit = breaker.try_acquire()
        if outcome == "ok":
            permit.success(latency)
        else:
            permit.failure(outcome)
        assert breaker.state is BreakerState.CLOSED


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.floats(0.0, 1.0),
    initial=st.floats(0.0, 20.0),
    steps=st.lists(st.booleans(), max_size=500),
)
def test_retries_never_exceed_the_budget(ratio, initial, steps):
    retries = RetryPolicy(
        medium_retry(retry_budget_ratio=ratio, retry_budget_initial_tokens=initial, retry_attempts=10**6)
    )
    granted = 0
    for is_first_attempt in steps:
        if is_first_attempt:
            retries.note_first_attempt()
        elif retries.should_retry(True, attempt=1):
            granted += 1
        assert granted <= initial + ratio * retries.counters["first_attempts"] + 1e-9
