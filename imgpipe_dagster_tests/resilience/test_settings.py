"""The legacy rates become concurrency limits by Little's law at the reference latency."""

import pytest

from imgpipe_dagster.resilience import BreakerSettings, LimiterSettings, legacy_profile


def test_defaults_are_the_legacy_medium_profile():
    limiter, breaker, retry = legacy_profile("medium")
    assert limiter == LimiterSettings()
    assert (limiter.resilience_initial_rate, limiter.resilience_min_rate, limiter.resilience_max_rate) == (10, 6, 30)
    assert (limiter.resilience_max_concurrent, limiter.resilience_max_queue, limiter.queue_timeout) == (24, 1000, 240)
    assert (breaker.circuit_failure_threshold, breaker.circuit_timeout_seconds) == (75, 45)
    assert (retry.retry_attempts, retry.retry_delay) == (2, 1.0)


@pytest.mark.parametrize(
    ("profile", "floor", "start", "ceiling"),
    [("conservative", 3.2, 4.8, 16), ("medium", 4.8, 8.0, 24), ("aggressive", 6.4, 12.0, 40)],
)
def test_rates_map_to_limits_at_the_reference_latency(profile, floor, start, ceiling):
    limiter, _, _ = legacy_profile(profile)
    # reference latency = max_concurrent / max_rate: the ceiling concurrency delivers the ceiling rate
    assert limiter.reference_latency_s == pytest.approx(ceiling / limiter.resilience_max_rate)
    assert limiter.min_limit == pytest.approx(floor)
    assert limiter.initial_limit == pytest.approx(start)
    assert limiter.max_limit == ceiling


def test_legacy_failure_count_becomes_a_window_twice_its_size_at_half_failures():
    medium = BreakerSettings()
    assert medium.window_size == 150
    assert medium.minimum_calls == 75
    assert medium.half_open_probes == medium.circuit_success_threshold == 3
    custom = BreakerSettings(circuit_failure_threshold=10, circuit_window_size=40, circuit_minimum_calls=20)
    assert (custom.window_size, custom.minimum_calls) == (40, 20)


def test_scaling_time_keeps_the_controller_and_moves_every_duration():
    medium = LimiterSettings()
    fast = medium.scaled(0.1)
    assert fast.rate_adjustment_interval == pytest.approx(1.0)
    assert fast.target_response_time_ms == pytest.approx(500)
    assert fast.resilience_max_rate == pytest.approx(300)
    assert (fast.min_limit, fast.initial_limit, fast.max_limit) == pytest.approx(
        (medium.min_limit, medium.initial_limit, medium.max_limit)
    )


def test_incoherent_settings_are_refused():
    with pytest.raises(ValueError):
        LimiterSettings(resilience_min_rate=40.0)
    with pytest.raises(ValueError):
        LimiterSettings(rate_critical_decrease_factor=0.95)
    with pytest.raises(ValueError):
        BreakerSettings(circuit_window_size=10, circuit_minimum_calls=20)
