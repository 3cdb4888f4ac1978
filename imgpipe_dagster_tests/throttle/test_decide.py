"""The throttle's decision rules, driven directly with a clock of our own."""

import pytest

from imgpipe_dagster.throttle.decide import (
    Backlog,
    GpuHealth,
    ThrottleSettings,
    ThrottleState,
    TickInputs,
    WindowStats,
    decide,
)

SETTINGS = ThrottleSettings(healthy_period_s=600, min_dwell_s=120, pause_min_s=300, max_submit_per_tick=8)
SHARDS = tuple(f"s{i:06d}" for i in range(1, 31))
GPU_UP = (
    GpuHealth("http://127.0.0.1:8000", reachable=True, status="ready", queue_size=0, queue_capacity=100),
)
GPU_DOWN = (GpuHealth("http://127.0.0.1:8000", reachable=False, error="ConnectError"),)


def healthy_window(**overrides):
    values = dict(
        window_s=300, results=1000, failed=10, timeouts=2, p95_inference_ms=1000, p95_download_ms=500
    )
    return WindowStats(**{**values, **overrides})


def inputs(now, window=None, gpus=GPU_UP, in_flight=0, shards_in_flight=(), candidates=SHARDS):
    return TickInputs(
        now=now, window=window or healthy_window(), gpus=gpus,
        backlog=Backlog(shards_with_work=len(candidates), urls_unfinished=len(candidates) * 100,
                        candidates=candidates),
        runs_in_flight=in_flight, shards_in_flight=shards_in_flight,
    )  # fmt: skip


def test_submits_into_free_slots_only_and_skips_shards_in_flight():
    state = ThrottleState(profile="medium")  # 10 workers
    decision = decide(inputs(0, in_flight=7, shards_in_flight=SHARDS[:2]), state, SETTINGS)
    assert decision.action == "submit"
    assert decision.submit == SHARDS[2:5]
    assert decision.limit == 10 and decision.free_slots == 3


def test_never_more_than_max_submit_per_tick():
    decision = decide(inputs(0, in_flight=0), ThrottleState(profile="aggressive"), SETTINGS)
    assert len(decision.submit) == SETTINGS.max_submit_per_tick


def test_holds_at_the_limit():
    decision = decide(inputs(0, in_flight=10), ThrottleState(profile="medium"), SETTINGS)
    assert decision.action == "hold" and decision.submit == ()
    assert "at the limit" in decision.reason


def test_idle_without_backlog():
    decision = decide(inputs(0, candidates=()), ThrottleState(profile="medium"), SETTINGS)
    assert decision.action == "idle" and decision.submit == ()


@pytest.mark.parametrize(
    ("window", "signal"),
    [
        (healthy_window(failed=300), "failure ratio"),
        (healthy_window(timeouts=150, failed=150), "timeout ratio"),
        (healthy_window(retryable=200, retryable_timeouts=200), "timeout ratio"),
        (healthy_window(p95_download_ms=9000), "p95 download"),
        (healthy_window(p95_inference_ms=130_000), "p95 inference"),
    ],
)
def test_steps_down_one_profile_on_each_degraded_signal(window, signal):
    decision = decide(inputs(0, window=window), ThrottleState(profile="aggressive"), SETTINGS)
    assert decision.action == "step_down"
    assert (decision.previous_profile, decision.profile) == ("aggressive", "medium")
    assert signal in decision.reason


def test_steps_down_once_per_dwell_and_stops_at_conservative():
    bad = healthy_window(failed=300)
    state = ThrottleState(profile="aggressive")
    first = decide(inputs(0, window=bad), state, SETTINGS)
    again = decide(inputs(60, window=bad), first.state, SETTINGS)
    assert again.profile == "medium" and again.action != "step_down"  # within min_dwell_s
    later = decide(inputs(200, window=bad), again.state, SETTINGS)
    assert later.profile == "conservative" and later.action == "step_down"
    floor = decide(inputs(400, window=bad), later.state, SETTINGS)
    assert floor.profile == "conservative" and "already conservative" in floor.reason
    assert floor.submit  # degraded at the floor still feeds its (smaller) slots


def test_steps_up_only_after_the_healthy_period():
    state = ThrottleState(profile="conservative")
    t = 0.0
    while t < SETTINGS.healthy_period_s:
        decision = decide(inputs(t), state, SETTINGS)
        assert decision.profile == "conservative", t
        state, t = decision.state, t + 30
    decision = decide(inputs(t), state, SETTINGS)
    assert decision.action == "step_up" and decision.profile == "medium"
    # the next step needs a whole new healthy period
    after = decide(inputs(t + 30), decision.state, SETTINGS)
    assert after.profile == "medium"


def test_one_unhealthy_tick_restarts_the_healthy_period():
    state = ThrottleState(profile="conservative")
    state = decide(inputs(0), state, SETTINGS).state
    # between the healthy and the step-down thresholds: neither step
    middle = decide(inputs(300, window=healthy_window(failed=150)), state, SETTINGS)
    assert middle.verdict == "neutral" and middle.profile == "conservative"
    state = middle.state
    assert state.healthy_since is None
    assert decide(inputs(600, window=healthy_window()), state, SETTINGS).profile == "conservative"


def test_too_few_samples_is_no_evidence_either_way():
    decision = decide(inputs(10_000, window=healthy_window(results=10, failed=10)),
                      ThrottleState(profile="medium", healthy_since=0), SETTINGS)  # fmt: skip
    assert decision.verdict == "insufficient" and decision.profile == "medium"
    assert decision.state.healthy_since is None


def test_never_steps_above_max_profile():
    settings = ThrottleSettings(healthy_period_s=60, min_dwell_s=0, max_profile="medium")
    state = ThrottleState(profile="medium", healthy_since=0)
    assert decide(inputs(1000), state, settings).profile == "medium"


def test_pauses_when_every_gpu_is_down_and_resumes_when_one_answers():
    state = ThrottleState(profile="medium")
    paused = decide(inputs(0, gpus=GPU_DOWN), state, SETTINGS)
    assert paused.action == "pause" and paused.paused and paused.submit == ()
    assert "every GPU server is down" in paused.reason and "127.0.0.1:8000" in paused.reason
    still = decide(inputs(30, gpus=GPU_DOWN), paused.state, SETTINGS)
    assert still.action == "hold" and still.paused and still.submit == ()
    resumed = decide(inputs(60, gpus=GPU_UP), still.state, SETTINGS)
    assert resumed.action == "resume" and not resumed.paused and resumed.profile == "medium"
    assert resumed.submit


def test_one_gpu_up_is_not_a_pause():
    gpus = GPU_DOWN + (
        GpuHealth("http://127.0.0.1:8001", reachable=True, status="ready", queue_capacity=100),
    )
    assert not decide(inputs(0, gpus=gpus), ThrottleState(profile="medium"), SETTINGS).paused


def test_failed_gpu_status_counts_as_down():
    gpus = (GpuHealth("http://127.0.0.1:8000", reachable=True, status="failed", error="CUDA OOM at load"),)
    decision = decide(inputs(0, gpus=gpus), ThrottleState(profile="medium"), SETTINGS)
    assert decision.paused and "CUDA OOM" in decision.reason


def test_no_known_gpu_is_not_a_pause():
    # managed mode before any server started: the first run starts them
    assert decide(inputs(0, gpus=()), ThrottleState(profile="medium"), SETTINGS).action == "submit"


def test_broken_network_pauses_then_probes_conservatively():
    broken = healthy_window(failed=950, top_errors=(("dns_failure", 900),))
    paused = decide(inputs(0, window=broken), ThrottleState(profile="aggressive"), SETTINGS)
    assert paused.action == "pause" and "network or the corpus is broken" in paused.reason
    assert "dns_failure" in paused.reason
    # still paused before pause_min_s, even once the window has emptied
    empty = WindowStats(window_s=300)
    held = decide(inputs(100, window=empty), paused.state, SETTINGS)
    assert held.paused and held.submit == ()
    # still failing at pause_min_s (runs that were in flight): stays paused
    assert decide(inputs(400, window=broken), held.state, SETTINGS).paused
    resumed = decide(inputs(400, window=empty), held.state, SETTINGS)
    assert resumed.action == "resume" and resumed.profile == "conservative" and resumed.submit


def test_full_gpu_queues_hold_new_runs():
    full = (
        GpuHealth("http://127.0.0.1:8000", reachable=True, status="ready", queue_size=95, queue_capacity=100),
    )
    decision = decide(inputs(0, gpus=full), ThrottleState(profile="medium"), SETTINGS)
    assert decision.action == "hold" and decision.submit == () and "GPU queues full" in decision.reason


def test_cursor_round_trip_and_garbage_starts_fresh():
    state = decide(inputs(0, gpus=GPU_DOWN), ThrottleState(profile="aggressive"), SETTINGS).state
    again = ThrottleState.from_cursor(state.to_cursor(), SETTINGS)
    assert again == state
    assert ThrottleState.from_cursor("not json", SETTINGS).profile == SETTINGS.start_profile
    assert ThrottleState.from_cursor(None, SETTINGS).profile == "medium"


def test_settings_from_environment():
    settings = ThrottleSettings.from_env({"IMGPIPE_THROTTLE_WINDOW_S": "600", "IMGPIPE_THROTTLE_START_PROFILE":
                                          "conservative"})  # fmt: skip
    assert settings.window_s == 600.0 and settings.start_profile == "conservative"
    assert settings.profiles["medium"].max_concurrent_workers == 10
    with pytest.raises(ValueError, match="IMGPIPE_THROTTLE_MIN_SAMPLES"):
        ThrottleSettings.from_env({"IMGPIPE_THROTTLE_MIN_SAMPLES": "many"})
