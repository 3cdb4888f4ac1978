"""The Kubernetes Job of a shard run, rendered by dagster-k8s's own launcher from deploy/k8s/dagster.yaml.

No cluster: the K8sRunLauncher is built from the documented instance config (with a kubeconfig that names
an unreachable server) and its batch API is a recorder that keeps the Job it was asked to create. The run
is a real run of the real ``analyze_<profile>`` job on a Postgres-backed instance, its tags from the job
definition (IMGPIPE_K8S_RUN_POD set as the deployment sets it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("dagster_k8s")

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTANCE_FILE = REPO_ROOT / "deploy" / "k8s" / "dagster.yaml"
RUN_POD_FILE = REPO_ROOT / "deploy" / "k8s" / "run_pod.yaml"
KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
    "users": [{"name": "none", "user": {"token": "unused"}}],
    "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
    "current-context": "none",
}


class RecordingBatchApi:
    """Stands in for the cluster's batch API: keeps the Jobs the launcher creates."""

    def __init__(self):
        self.created: list = []

    def create_namespaced_job(self, body, namespace, **_):
        self.created.append((namespace, body))
        return body


def render_job(instance, tmp_path: Path, profile: str):
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.launcher import LaunchRunContext
    from dagster_k8s import K8sRunLauncher

    from imgpipe_dagster.definitions import defs
    from imgpipe_dagster.jobs import analysis_job, analysis_job_name
    from imgpipe_dagster.profiles import profile_run_config

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(KUBECONFIG))
    config = yaml.safe_load(INSTANCE_FILE.read_text())["run_launcher"]["config"]
    batch_api = RecordingBatchApi()
    launcher = K8sRunLauncher(
        **{**config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)},
        k8s_client_batch_api=batch_api,
    )
    launcher.register_instance(instance)

    job = analysis_job(profile)  # built after IMGPIPE_K8S_RUN_POD is set, as the code location would be
    repository = ReconstructableRepository.for_module(
        "imgpipe_dagster.definitions", "defs", working_directory=str(REPO_ROOT)
    )
    origin = repository.get_reconstructable_job(analysis_job_name(profile)).get_python_origin()
    job_def = defs.resolve_job_def(analysis_job_name(profile))
    run = instance.create_run_for_job(
        job_def=job_def, run_config=profile_run_config(profile), tags=job.tags, job_code_origin=origin
    )
    launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    assert len(batch_api.created) == 1
    namespace, body = batch_api.created[0]
    return run, namespace, body


@pytest.mark.parametrize(("profile", "gpus"), [("aggressive", "2"), ("medium", "1")])
def test_the_run_job_asks_for_the_profiles_gpus_on_gpu_nodes_with_secrets_by_reference(
    dagster_instance, tmp_path, monkeypatch, profile, gpus
):
    from imgpipe_dagster.profiles import resolve

    monkeypatch.setenv("IMGPIPE_K8S_RUN_POD", str(RUN_POD_FILE))
    run, namespace, job = render_job(dagster_instance, tmp_path, profile)
    assert namespace == "imgpipe"
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == "registry.example.com/imgpipe-dagster:0.1.0"
    assert container.args[:2] == ["dagster", "api"] and run.run_id in " ".join(container.args)

    limits, requests = container.resources.limits, container.resources.requests
    assert limits["nvidia.com/gpu"] == gpus
    assert requests["cpu"] == str(resolve(profile)[0].image_resize_threads + 1)
    pods = yaml.safe_load(RUN_POD_FILE.read_text())
    expected_memory = (pods["profiles"].get(profile) or {}).get("memory", pods["default"]["memory"])
    assert limits["memory"] == requests["memory"] == expected_memory
    assert pod.node_selector["nvidia.com/gpu.present"] == "true"
    if profile == "aggressive":
        assert pod.node_selector["nvidia.com/gpu.count"] == "2"
    assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in pod.tolerations)

    env = {e.name: e for e in container.env}
    for name, key in [
        ("IMGPIPE_DATABASE_URL", "database-url"),
        ("IMGPIPE_DAGSTER_DATABASE_URL", "dagster-database-url"),
        ("IMGPIPE_GPU_TOKEN", "gpu-token"),
    ]:
        assert env[name].value is None, f"{name} must come from the secret, not a literal"
        assert env[name].value_from.secret_key_ref.name == "imgpipe-secrets"
        assert env[name].value_from.secret_key_ref.key == key
    assert env["IMGPIPE_DEPLOYMENT"].value == "local"
    assert env["IMGPIPE_K8S_RUN_POD"].value.endswith("run_pod.yaml")
    assert env["DAGSTER_RUN_JOB_NAME"].value == f"analyze_{profile}"
    assert job.metadata.labels["dagster/run-id"] == run.run_id
    # the tag the job carries is what the launcher applied
    assert json.loads(run.tags["dagster-k8s/config"])["container_config"]["resources"]["limits"] == {
        k: v for k, v in limits.items() if k in ("nvidia.com/gpu", "memory")
    }
    assert run.tags["dagster/max_runtime"].isdigit()


def test_a_broken_run_pod_file_is_a_one_line_error_naming_the_field(tmp_path):
    from imgpipe_dagster.deploy.k8s import RunPodError, load_run_pods

    bad = tmp_path / "run_pod.yaml"
    bad.write_text("default: {gpus: -1}\n")
    with pytest.raises(RunPodError, match=r"default\.gpus must be a whole number >= 0, got -1"):
        load_run_pods(bad)
    bad.write_text("default: {gpu: 1}\n")
    with pytest.raises(RunPodError, match=r"unknown field\(s\) \['gpu'\]") as error:
        load_run_pods(bad)
    assert "\n" not in str(error.value)


def test_without_a_run_pod_file_the_jobs_carry_no_kubernetes_tag(monkeypatch):
    from imgpipe_dagster.jobs import analysis_job

    monkeypatch.delenv("IMGPIPE_K8S_RUN_POD", raising=False)
    assert "dagster-k8s/config" not in analysis_job("medium").tags


@pytest.mark.parametrize("variant", ["k8s", "celery"])
def test_the_deploy_instance_files_are_valid_dagster_instance_config(variant, tmp_path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    monkeypatch.setenv("IMGPIPE_DAGSTER_DATABASE_URL", "postgresql+psycopg2://imgpipe@db-host/imgpipe_dagster")
    monkeypatch.setenv("IMGPIPE_CELERY_BROKER", "redis://redis-host:6379/0")
    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "deploy" / variant / "dagster.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_launcher"]["class"] == {"k8s": "K8sRunLauncher", "celery": "CeleryRunLauncher"}[variant]
    assert config["run_monitoring"]["enabled"]
