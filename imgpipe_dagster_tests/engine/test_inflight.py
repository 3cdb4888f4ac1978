"""Downloads in flight from Little's law, within their bounds, shared across the runs of a machine."""

from __future__ import annotations

from imgpipe_dagster.engine.inflight import InFlightBounds, InFlightController, MachineBudget, Sample


def sample(at: float, urls: int, slot_s: float, images: int, in_flight: int | None, gpu_fill: float = 0.0,
           body_bytes: int = 0) -> Sample:  # fmt: skip
    """Every image a URL (slot seconds spread evenly over them)."""
    return Sample(at=at, urls_completed=urls, slot_seconds=slot_s, ok_completed=images,
                  ok_slot_seconds=slot_s * images / urls if urls else 0.0, images_to_gpu=images,
                  body_bytes=body_bytes, in_flight=in_flight, gpu_queue_fill=gpu_fill)  # fmt: skip


def test_starts_at_the_legacy_value_and_grows_while_the_gpu_waits_and_the_limit_is_used():
    controller = InFlightController(InFlightBounds(floor=15, ceiling=1000))
    assert controller.limit == 15
    controller.step(sample(0, 0, 0, 0, 15))
    limits = [controller.step(sample(t, 10 * t, 19.0 * t, 8 * t, controller.limit)) for t in range(1, 30)]
    assert limits == sorted(limits) and limits[-1] == 1000


def test_holds_when_the_limit_is_not_in_use():
    controller = InFlightController(InFlightBounds(floor=15, ceiling=1000))
    controller.step(sample(0, 0, 0, 0, 3))
    assert controller.step(sample(1, 5, 2.0, 5, 3)) == 15


def test_littles_law_from_a_configured_gpu_capacity():
    # 100 images/s x 1.25 headroom / 0.8 images per URL = 156.25 URLs/s, x 2 s a slot = 313 in flight;
    # a step moves at most a factor of two, so it takes a few steps to get there
    controller = InFlightController(InFlightBounds(floor=15, ceiling=5000, gpu_capacity_images_per_s=100))
    controller.step(sample(0, 0, 0, 0, 15))
    for t in range(1, 10):
        controller.step(sample(t, 100 * t, 200.0 * t, 80 * t, controller.limit))
    assert controller.limit == 313
    assert "Little's law" in controller.reason


def test_images_waiting_for_the_gpu_tier_measure_its_rate():
    # images queue for the GPU tier: it takes 50 images/s; 0.5 s a slot -> 50 x 1.25 x 0.5 = 32
    controller = InFlightController(InFlightBounds(floor=4, ceiling=5000))
    controller.limit = 200
    controller.step(sample(0, 0, 0, 0, 200, gpu_fill=0.9))
    for t in range(1, 8):
        controller.step(sample(t, 50 * t, 25.0 * t, 50 * t, controller.limit, gpu_fill=0.9))
    assert controller.limit == 32


def test_bounded_by_the_byte_cap():
    # 64 MiB of bodies in flight at 1 MiB an image: 64 downloads at most
    controller = InFlightController(InFlightBounds(floor=10, ceiling=5000, byte_cap=64 * 2**20))
    controller.step(sample(0, 0, 0, 0, 10))
    for t in range(1, 15):
        controller.step(sample(t, 10 * t, 20.0 * t, 10 * t, controller.limit, body_bytes=10 * t * 2**20))
    assert controller.limit == 64


def test_the_machine_budget_is_shared_by_the_live_runs(tmp_path):
    first = MachineBudget(tmp_path, "run-a", total=1000)
    second = MachineBudget(tmp_path, "run-b", total=1000)
    assert first.share(900) == 900
    # the other run holds 900: this one gets what is left, but never less than an equal share
    assert second.share(900) == 500
    assert first.share(900) == 500
    second.close()
    assert first.share(900) == 900


def test_the_floor_wins_over_every_bound(tmp_path):
    budget = MachineBudget(tmp_path, "run-a", total=4)
    controller = InFlightController(InFlightBounds(floor=15, ceiling=1000), budget=budget)
    controller.step(sample(0, 0, 0, 0, 15))
    assert controller.step(sample(1, 10, 20.0, 10, 15)) == 15


def test_shrinks_when_downloads_queue_behind_something_saturated():
    # unloaded a download takes 0.05 s; then each one takes 0.5 s while the limit is in use
    controller = InFlightController(InFlightBounds(floor=10, ceiling=1000))
    controller.limit = 400
    controller.step(sample(0, 0, 0, 0, 400))
    controller.step(sample(1, 100, 5.0, 100, 400))
    before = controller.limit
    reasons = []
    for t in range(2, 16):
        controller.step(sample(t, 100 * t, 5.0 + 50.0 * (t - 1), 100 * t, controller.limit))
        reasons.append(controller.reason)
    assert controller.limit < before and controller.threshold < before
    assert any("saturated" in reason for reason in reasons)


def test_after_an_overload_the_limit_creeps_up_instead_of_multiplying():
    controller = InFlightController(InFlightBounds(floor=10, ceiling=1000))
    controller.limit, controller.threshold = 200, 200
    controller.step(sample(0, 0, 0, 0, 200))
    assert controller.step(sample(1, 100, 5.0, 100, 200)) == 210


def test_grows_when_the_fetchers_look_ahead_is_full_though_few_downloads_hold_a_slot():
    # hosts that make URLs wait fill the fetcher's look-ahead; other hosts' URLs wait in the run
    waiting = Sample(at=1, urls_completed=10, slot_seconds=5.0, ok_completed=10, ok_slot_seconds=5.0,
                     images_to_gpu=10, body_bytes=0, in_flight=3, gpu_queue_fill=0.0, waiting_for_fetcher=50)  # fmt: skip
    controller = InFlightController(InFlightBounds(floor=20, ceiling=1000))
    controller.step(sample(0, 0, 0, 0, 3))
    assert controller.step(waiting) == 40
    idle = InFlightController(InFlightBounds(floor=20, ceiling=1000))
    idle.step(sample(0, 0, 0, 0, 3))
    assert idle.step(sample(1, 10, 5.0, 10, 3)) == 20
