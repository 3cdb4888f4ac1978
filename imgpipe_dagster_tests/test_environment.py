"""The IMGPIPE_* environment read once into a typed object, and the resource set it chooses."""

from __future__ import annotations

import pytest
from dagster import EnvVar

from imgpipe_dagster.definitions import deployment_resources
from imgpipe_dagster.environment import EnvironmentValueError, read_environment
from imgpipe_dagster.profiles import resolve


def test_documented_variables_are_parsed_into_typed_fields():
    env = read_environment({
        "IMGPIPE_MODEL_PATH": "/models/q", "IMGPIPE_GPU_DEVICES": "cuda:0, cuda:1", "IMGPIPE_GPU_BASE_PORT": "9000",
        "IMGPIPE_ALLOWED_NETWORKS": "127.0.0.0/8,", "IMGPIPE_GPU_ENDPOINTS": "http://a:8000/,http://b:8000",
        "IMGPIPE_MAX_NEW_TOKENS": "32",
    })  # fmt: skip
    assert env.deployment == "local" and env.model_path == "/models/q"
    assert env.gpu_devices == ("cuda:0", "cuda:1") and env.gpu_base_port == 9000 and env.max_new_tokens == 32
    assert env.allowed_networks == ("127.0.0.0/8",)
    assert env.gpu_endpoints == ("http://a:8000", "http://b:8000")
    assert read_environment({}).gpu_devices is None and read_environment({}).gpu_base_port is None


@pytest.mark.parametrize(
    ("environ", "named"),
    [({"IMGPIPE_GPU_BASE_PORT": "eighty"}, "IMGPIPE_GPU_BASE_PORT"),
     ({"IMGPIPE_MAX_NEW_TOKENS": "0"}, "IMGPIPE_MAX_NEW_TOKENS"),
     ({"IMGPIPE_DEPLOYMENT": "cloud"}, "IMGPIPE_DEPLOYMENT")],
)  # fmt: skip
def test_a_malformed_value_gets_an_error_naming_the_variable(environ, named):
    with pytest.raises(EnvironmentValueError, match=named):
        read_environment(environ)


def test_the_local_deployment_manages_servers_with_the_environment_values():
    resources = deployment_resources(read_environment({
        "IMGPIPE_GPU_DEVICES": "cpu", "IMGPIPE_GPU_BASE_PORT": "0", "IMGPIPE_MODEL_PATH": "/m",
        "IMGPIPE_ALLOWED_NETWORKS": "10.0.0.0/8",
    }))  # fmt: skip
    gpu_model = resources["gpu_model"]
    assert (gpu_model.mode, gpu_model.devices, gpu_model.base_port, gpu_model.model_path) == ("managed", ["cpu"], 0, "/m")
    assert resources["fetcher"].allowed_networks == ["10.0.0.0/8"]


def test_the_external_deployment_attaches_to_the_listed_and_the_registered_servers(monkeypatch):
    monkeypatch.setenv("IMGPIPE_GPU_TOKEN", "secret-token")
    environ = {"IMGPIPE_DEPLOYMENT": "external", "IMGPIPE_GPU_ENDPOINTS": "http://gpu-1:8000",
               "IMGPIPE_GPU_TOKEN": "secret-token"}  # fmt: skip
    gpu_model = deployment_resources(read_environment(environ))["gpu_model"]
    assert (gpu_model.mode, gpu_model.endpoints) == ("external", ["http://gpu-1:8000"])
    # The token is handed over by name (dagster.EnvVar): the resource's config never holds the value.
    assert isinstance(gpu_model.token, EnvVar) and gpu_model.token == "IMGPIPE_GPU_TOKEN"
    registry_only = deployment_resources(read_environment({"IMGPIPE_DEPLOYMENT": "external"}))["gpu_model"]
    assert registry_only.endpoints == [] and registry_only.use_registry


def test_the_openai_tier_is_chosen_by_the_environment_and_its_key_handed_over_by_name(monkeypatch):
    monkeypatch.setenv("IMGPIPE_OPENAI_API_KEY", "sk-local")
    environ = {"IMGPIPE_GPU_API": "openai", "IMGPIPE_OPENAI_API_KEY": "sk-local", "IMGPIPE_OPENAI_MODEL": "qwen"}
    gpu_model = deployment_resources(read_environment(environ))["gpu_model"]
    assert (gpu_model.api, gpu_model.openai_model) == ("openai", "qwen")
    assert isinstance(gpu_model.api_key, EnvVar) and gpu_model.api_key == "IMGPIPE_OPENAI_API_KEY"
    with pytest.raises(EnvironmentValueError, match="IMGPIPE_GPU_API"):
        read_environment({"IMGPIPE_GPU_API": "grpc"})


def test_the_operator_sets_the_contact_url_and_may_switch_robots_txt_off():
    polite = deployment_resources(read_environment({"IMGPIPE_CONTACT_URL": "https://example.org/crawler"}))
    assert polite["fetcher"].contact_url == "https://example.org/crawler"
    assert polite["fetcher"].obey_robots_txt is True
    assert "https://example.org/crawler" in polite["fetcher"].settings(resolve("medium")[0]).user_agent_header
    permitted = deployment_resources(read_environment({"IMGPIPE_IGNORE_ROBOTS_TXT": "1"}))
    assert permitted["fetcher"].obey_robots_txt is False
