"""The Kubernetes pod of a shard run, per profile: the value of the ``dagster-k8s/config`` run tag.

``IMGPIPE_K8S_RUN_POD`` names a YAML file (``deploy/k8s/run_pod.yaml`` is the documented one) with a
``default`` pod and per-profile overrides:

```yaml
default: {gpus: 1, memory: 16Gi, node_selector: {nvidia.com/gpu.present: "true"}}
profiles: {aggressive: {gpus: 2, memory: 32Gi}}
```

The CPU request comes from the profile itself (its ``image_resize_threads`` decode threads plus one for
the event loop), the GPU limit (``nvidia.com/gpu``: the run's managed GPU servers live in its pod), memory,
node selector and tolerations from the file. ``K8sRunLauncher`` merges this tag over its own
``run_k8s_config`` (image, secrets: deploy/k8s/dagster.yaml). No Dagster here.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from imgpipe_dagster.profiles import resolve

# dagster-k8s's run tag (dagster_k8s.job.K8S_RESOURCE_REQUIREMENTS_KEY), spelled out so a job definition
# does not need dagster-k8s installed.
K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
POD_FIELDS = ("gpus", "memory", "node_selector", "tolerations")


class RunPodError(ValueError):
    """The run pod file cannot be used; the message names the file and the field."""


def load_run_pods(path: str | Path) -> dict:
    """The file's ``default`` pod and ``profiles`` overrides, checked."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise RunPodError(f"{path}: cannot read the run pod file ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict) or set(data) - {"default", "profiles"}:
        raise RunPodError(f"{path}: expected the keys 'default' and 'profiles', got {sorted(data)}")
    sections = [("default", data.get("default") or {})]
    sections += [(f"profiles.{name}", pod) for name, pod in (data.get("profiles") or {}).items()]
    for where, pod in sections:
        unknown = set(pod) - set(POD_FIELDS)
        if unknown:
            raise RunPodError(
                f"{path}: {where}: unknown field(s) {sorted(unknown)}; known: {', '.join(POD_FIELDS)}"
            )
        gpus = pod.get("gpus", 0)
        if not isinstance(gpus, int) or gpus < 0:
            raise RunPodError(f"{path}: {where}.gpus must be a whole number >= 0, got {gpus!r}")
    return data


def run_pod_config(profile: str, pods: dict) -> dict:
    """The ``dagster-k8s/config`` value of the profile's shard runs."""
    pod = {**(pods.get("default") or {}), **((pods.get("profiles") or {}).get(profile) or {})}
    worker, _ = resolve(profile)
    cpu = str(worker.image_resize_threads + 1)
    requests: dict[str, str] = {"cpu": cpu}
    limits: dict[str, str] = {}
    if pod.get("memory"):
        requests["memory"] = limits["memory"] = str(pod["memory"])
    if pod.get("gpus"):
        # extended resources are limits only (the request follows the limit)
        limits[GPU_RESOURCE] = str(pod["gpus"])
    config: dict = {"container_config": {"resources": {"requests": requests, "limits": limits}}}
    pod_spec: dict = {}
    if pod.get("node_selector"):
        pod_spec["node_selector"] = {str(k): str(v) for k, v in pod["node_selector"].items()}
    if pod.get("tolerations"):
        pod_spec["tolerations"] = list(pod["tolerations"])
    if pod_spec:
        config["pod_spec_config"] = pod_spec
    return config


def run_pod_tags(profile: str, pod_file: str | None) -> dict[str, str]:
    """``{dagster-k8s/config: json}`` for the profile's jobs when a run pod file is set, else nothing."""
    if not pod_file:
        return {}
    return {K8S_CONFIG_TAG: json.dumps(run_pod_config(profile, load_run_pods(pod_file)), sort_keys=True)}
