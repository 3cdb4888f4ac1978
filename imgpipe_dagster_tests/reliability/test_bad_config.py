"""Malformed run configs give one clear error naming the field, and write nothing.

Type errors (a string rate, an unknown field or profile) are Dagster config errors at launch;
value errors the types cannot express (min above max) are ProfileErrors when the run starts, before
it touches the corpus or starts a GPU server. Every profiles/*.yaml validates against its
analyze_<profile> job.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import DagsterInvalidConfigError, Definitions, define_asset_job, materialize, validate_run_config

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.jobs import analysis_job_name
from imgpipe_dagster.partitions import URL_SHARDS, url_shards
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.profiles import PROFILE_NAMES, ProfileError, resolve
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster_tests.support import refused_port, seed_corpus

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


def run_config(profile="medium", **worker) -> dict:
    return {"ops": {"image_analysis": {"config": {"profile": profile, "worker": worker}}}}


@pytest.fixture(scope="module")
def analysis_job():
    """image_analysis as a job with the project's resources (the shape of analyze_<profile>)."""
    job = define_asset_job("analyze_under_test", selection=[image_analysis], partitions_def=url_shards)
    defs = Definitions(
        assets=[image_analysis], jobs=[job],
        resources={"postgres": PostgresResource(), "gpu_model": GpuModelResource(), "fetcher": FetcherResource()},
    )  # fmt: skip
    return defs.resolve_job_def("analyze_under_test")


def _config_errors(job, config: dict) -> list[str]:
    with pytest.raises(DagsterInvalidConfigError) as raised:
        validate_run_config(job, config)
    return [error.message for error in raised.value.errors]


def test_a_string_rate_is_refused_naming_the_field(analysis_job):
    (error,) = _config_errors(analysis_job, run_config(resilience_initial_rate="fast"))
    assert "resilience_initial_rate" in error and "fast" in error


def test_an_unknown_field_is_refused_naming_it(analysis_job):
    (error,) = _config_errors(analysis_job, run_config(max_concurent_workers=4))
    assert "max_concurent_workers" in error


def test_an_unknown_profile_is_refused_naming_the_choices(analysis_job):
    (error,) = _config_errors(analysis_job, run_config(profile="turbo"))
    assert "turbo" in error and "profile" in error


def test_min_above_max_is_one_profile_error_naming_the_fields():
    with pytest.raises(ProfileError) as raised:
        resolve("medium", {"resilience_min_rate": 50.0})
    message = str(raised.value)
    assert message.count(";") == 0, message  # one problem, one message
    assert "resilience_min_rate" in message and "resilience_max_rate" in message and "50.0" in message


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: resolve("turbo"), ["turbo", "conservative", "medium", "aggressive"]),
        (lambda: resolve("medium", {"max_concurent_workers": 4}), ["worker.max_concurent_workers"]),
        (lambda: resolve("medium", {"resilience_initial_rate": "fast"}), ["worker.resilience_initial_rate"]),
        (lambda: resolve("medium", {"lease_seconds": 1}), ["worker.lease_seconds"]),
        (lambda: resolve("medium", None, {"max_new_tokens": 0}), ["gpu_server.max_new_tokens"]),
    ],
    ids=["unknown profile", "unknown field", "string rate", "lease too short", "zero tokens"],
)
def test_profile_errors_name_the_field(call, names):
    with pytest.raises(ProfileError) as raised:
        call()
    assert all(name in str(raised.value) for name in names), str(raised.value)


@pytest.fixture
def shut_port():
    """The GPU base port of a run that must never start a server: held, so nothing else answers there."""
    with refused_port() as port:
        yield port


def _snapshot(conn) -> list[tuple]:
    return conn.execute(
        "SELECT url, state::text, attempts, lease_owner FROM corpus_urls ORDER BY url"
    ).fetchall() + conn.execute("SELECT url, status FROM url_analysis_results ORDER BY url").fetchall()


@pytest.mark.parametrize(
    ("config", "field", "at"),
    [
        (run_config(resilience_initial_rate="fast"), "resilience_initial_rate", "launch"),
        (run_config(profile="turbo"), "profile", "launch"),
        (run_config(max_concurent_workers=4), "max_concurent_workers", "launch"),
        (run_config(resilience_min_rate=50.0), "resilience_min_rate", "run start"),
    ],
    ids=["string rate", "unknown profile", "unknown field", "min above max"],
)
def test_a_bad_config_writes_nothing(dagster_instance, database_url, conn, imgpipe_home, shut_port, config, field, at):
    seed_corpus(conn, {"s000001": [f"http://10.0.0.1/{n}.jpg" for n in range(5)]})
    dagster_instance.add_dynamic_partitions(URL_SHARDS, ["s000001"])
    before = _snapshot(conn)
    gpu_state = gpu_server_records_dir(imgpipe_home)
    resources = {
        "postgres": PostgresResource(database_url=database_url),
        "gpu_model": GpuModelResource(devices=["cpu"], base_port=shut_port),  # must never be started
        "fetcher": FetcherResource(),
    }

    if at == "launch":
        with pytest.raises(DagsterInvalidConfigError) as raised:
            materialize([image_analysis], instance=dagster_instance, partition_key="s000001", resources=resources,
                        run_config=config)  # fmt: skip
        messages = [error.message for error in raised.value.errors]
        assert len(messages) == 1 and field in messages[0], messages
    else:
        result = materialize([image_analysis], instance=dagster_instance, partition_key="s000001",
                             resources=resources, run_config=config, raise_on_error=False)  # fmt: skip
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        message = failure.event_specific_data.error.message
        assert "invalid profile settings" in message and field in message, message
        assert result.get_asset_materialization_events() == []

    assert _snapshot(conn) == before  # no URL leased, charged or written
    assert not any(gpu_state.glob("gpu-server-*.json")), "a GPU server was started for a bad config"


def _profile_file(profile: str) -> dict:
    return yaml.safe_load((PROFILES_DIR / f"{profile}.yaml").read_text())


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_each_profile_file_is_a_valid_run_config(analysis_job, profile):
    config = _profile_file(profile)
    assert config["ops"]["image_analysis"]["config"]["profile"] == profile  # the file is the profile it is named for
    assert validate_run_config(analysis_job, config)
    worker, gpu_server = resolve(profile)  # raises a ProfileError naming the field if a value is out of range
    values = config["ops"]["image_analysis"]["config"]
    assert {name: getattr(worker, name) for name in values["worker"]} == values["worker"]
    assert {name: getattr(gpu_server, name) for name in values["gpu_server"]} == values["gpu_server"]


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_each_profile_file_fits_its_analyze_job(profile):
    """Against the code location's own analyze_<profile> job: a code location that does not load fails here."""
    from imgpipe_dagster.definitions import defs

    job = defs.resolve_job_def(analysis_job_name(profile))
    assert validate_run_config(job, _profile_file(profile))
