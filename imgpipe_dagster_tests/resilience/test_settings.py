"""Every value of profiles/*.yaml reaches its typed field through settings_map, and the legacy rates
become concurrency limits by Little's law at the reference latency."""

from dataclasses import fields, is_dataclass

import pytest
import yaml

from imgpipe_dagster.profiles import PROFILE_NAMES, ProfileError, profiles_dir, resolve
from imgpipe_dagster.settings_map import (
    engine_settings,
    model_settings,
    profile_engine_settings,
    server_settings,
)
from imgpipe_dagster_tests.resilience.medium import medium_breaker, medium_limiter

# Worker values that steer the Dagster side, not a shard run: the throttle sensor's ceiling of runs.
NOT_IN_A_RUN = {"max_concurrent_workers"}


def yaml_sections(profile: str) -> tuple[dict, dict]:
    """The worker and gpu_server values exactly as written in profiles/<profile>.yaml."""
    document = yaml.safe_load((profiles_dir() / f"{profile}.yaml").read_text())
    config = document["ops"]["image_analysis"]["config"]
    return config["worker"], config["gpu_server"]


def typed_fields(root: object, prefix: str = "") -> dict[str, object]:
    """Every leaf field of a settings object, by name, with its dotted path."""
    found: dict[str, object] = {}
    for item in fields(root):
        value = getattr(root, item.name)
        if is_dataclass(value):
            found.update(typed_fields(value, f"{prefix}{item.name}."))
        else:
            found[f"{prefix}{item.name}"] = value
    return found


def landing(worker_values: dict | None, gpu_values: dict | None, profile: str) -> dict[str, object]:
    worker, gpu = resolve(profile, worker_values, gpu_values)
    typed = typed_fields(engine_settings(worker))
    typed.update({f"server.{k}": v for k, v in typed_fields(server_settings(gpu, model_settings(gpu, "m"))).items()})
    return typed


def find(typed: dict[str, object], name: str, section: str = "worker") -> list[str]:
    """Paths of the typed fields named ``name`` on the section's side (engine or ``server.``)."""
    side = [path for path in typed if path.startswith("server.") == (section == "gpu_server")]
    return [path for path in side if path.rpartition(".")[2] == name]


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_every_yaml_value_reaches_exactly_one_typed_field(profile):
    worker_yaml, gpu_yaml = yaml_sections(profile)
    typed = landing(None, None, profile)
    for section, values in (("worker", worker_yaml), ("gpu_server", gpu_yaml)):
        for name, value in values.items():
            if name in NOT_IN_A_RUN:
                continue
            paths = find(typed, name, section)
            assert len(paths) == 1, f"{section}.{name} lands in {paths or 'no typed field'}"
            assert typed[paths[0]] == value, f"{section}.{name}: yaml {value!r}, {paths[0]} {typed[paths[0]]!r}"


def changed(value):
    """Candidate other values for a yaml value (the first one the profile model accepts is used)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    return [value * 1.01, value * 0.99]


@pytest.mark.parametrize("section", ["worker", "gpu_server"])
def test_changing_a_profile_value_changes_its_typed_field(section):
    """Values equal in all three files (enable_keepalive, max_gpu_tries...) must flow too."""
    worker_yaml, gpu_yaml = yaml_sections("medium")
    values = worker_yaml if section == "worker" else gpu_yaml
    for name, value in values.items():
        if name in NOT_IN_A_RUN:
            continue
        for other in changed(value):
            override = {name: other}
            try:
                typed = landing(override if section == "worker" else None, override if section != "worker" else None,
                                "medium")  # fmt: skip
            except ProfileError:
                continue
            (path,) = find(typed, name, section)
            assert typed[path] == other, f"{section}.{name} changed to {other!r} but {path} is {typed[path]!r}"
            break
        else:
            pytest.fail(f"no other valid value found for {section}.{name}")


def test_the_worker_ceiling_of_runs_is_validated_but_not_a_run_setting():
    worker, _ = resolve("medium")
    assert worker.max_concurrent_workers == yaml_sections("medium")[0]["max_concurrent_workers"]
    assert not find(landing(None, None, "medium"), "max_concurrent_workers")


@pytest.mark.parametrize(
    ("profile", "floor", "start", "ceiling"),
    [("conservative", 3.2, 4.8, 16), ("medium", 4.8, 8.0, 24), ("aggressive", 6.4, 12.0, 40)],
)
def test_rates_map_to_limits_at_the_reference_latency(profile, floor, start, ceiling):
    limiter = profile_engine_settings(profile).limiter
    # reference latency = max_concurrent / max_rate: the ceiling concurrency delivers the ceiling rate
    assert limiter.reference_latency_s == pytest.approx(ceiling / limiter.resilience_max_rate)
    assert limiter.min_limit == pytest.approx(floor)
    assert limiter.initial_limit == pytest.approx(start)
    assert limiter.max_limit == ceiling


def test_legacy_failure_count_becomes_a_window_twice_its_size_at_half_failures():
    medium = medium_breaker()
    assert medium.window_size == 150
    assert medium.minimum_calls == 75
    assert medium.half_open_probes == medium.circuit_success_threshold == 3
    custom = medium_breaker(circuit_failure_threshold=10, circuit_window_size=40, circuit_minimum_calls=20)
    assert (custom.window_size, custom.minimum_calls) == (40, 20)


def test_scaling_time_keeps_the_controller_and_moves_every_duration():
    medium = medium_limiter()
    fast = medium.scaled(0.1)
    assert fast.rate_adjustment_interval == pytest.approx(1.0)
    assert fast.target_response_time_ms == pytest.approx(500)
    assert fast.resilience_max_rate == pytest.approx(300)
    assert (fast.min_limit, fast.initial_limit, fast.max_limit) == pytest.approx(
        (medium.min_limit, medium.initial_limit, medium.max_limit)
    )


def test_incoherent_settings_are_refused():
    with pytest.raises(ValueError):
        medium_limiter(resilience_min_rate=40.0)
    with pytest.raises(ValueError):
        medium_limiter(rate_critical_decrease_factor=0.95)
    with pytest.raises(ValueError):
        medium_breaker(circuit_window_size=10, circuit_minimum_calls=20)


def test_a_settings_object_cannot_be_built_without_its_profile_values():
    from imgpipe_dagster.resilience import LimiterSettings

    with pytest.raises(TypeError):
        LimiterSettings()  # type: ignore[call-arg]
