"""The ``IMGPIPE_*`` environment, read in one place into one typed object.

``read_environment()`` parses the variables the README documents (and a few for operators) with a
clear error for a malformed value; ``IMGPIPE_THROTTLE_<FIELD>`` knobs stay with
``throttle.decide.ThrottleSettings.from_env``, which maps each onto its field. ``definitions.py`` reads it
once to build the resources of the chosen deployment; the store, sensors, schedule and commands call
``read_environment()`` when they need a value (not at import), so a changed variable takes effect.
Nothing else should call ``os.environ`` for an ``IMGPIPE_*`` variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

HOME_ENV = "IMGPIPE_HOME"
DEPLOYMENT_ENV = "IMGPIPE_DEPLOYMENT"
MODEL_PATH_ENV = "IMGPIPE_MODEL_PATH"
MAX_NEW_TOKENS_ENV = "IMGPIPE_MAX_NEW_TOKENS"
GPU_TOKEN_ENV = "IMGPIPE_GPU_TOKEN"
GPU_DEVICES_ENV = "IMGPIPE_GPU_DEVICES"
GPU_BASE_PORT_ENV = "IMGPIPE_GPU_BASE_PORT"
GPU_ENDPOINTS_ENV = "IMGPIPE_GPU_ENDPOINTS"
ALLOWED_NETWORKS_ENV = "IMGPIPE_ALLOWED_NETWORKS"
CORPUS_DIR_ENV = "IMGPIPE_CORPUS_DIR"
TIMEZONE_ENV = "IMGPIPE_TIMEZONE"
NIGHTLY_SHARDS_ENV = "IMGPIPE_NIGHTLY_SHARDS"
NIGHTLY_AUTOSTART_ENV = "IMGPIPE_NIGHTLY_AUTOSTART"
THROTTLE_AUTOSTART_ENV = "IMGPIPE_THROTTLE_AUTOSTART"
DATABASE_URL_ENV = "IMGPIPE_DATABASE_URL"
DAGSTER_DATABASE_URL_ENV = "IMGPIPE_DAGSTER_DATABASE_URL"
PG_SHARED_BUFFERS_ENV = "IMGPIPE_PG_SHARED_BUFFERS_MB"
CONTACT_URL_ENV = "IMGPIPE_CONTACT_URL"
IGNORE_ROBOTS_TXT_ENV = "IMGPIPE_IGNORE_ROBOTS_TXT"
EXPORT_URI_ENV = "IMGPIPE_EXPORT_URI"
RUN_MAX_RUNTIME_ENV = "IMGPIPE_RUN_MAX_RUNTIME_S"
K8S_RUN_POD_ENV = "IMGPIPE_K8S_RUN_POD"
PROMPT_ENV = "IMGPIPE_PROMPT"
IMAGE_STORE_ENV = "IMGPIPE_IMAGE_STORE"
# IMGPIPE_IMAGE_STORE values that mean "on, in the default place" (paths.image_store_dir)
IMAGE_STORE_DEFAULT_VALUES = ("1", "true", "yes", "on")
IMAGE_STORE_DEFAULT = "default"
GPU_API_ENV = "IMGPIPE_GPU_API"
OPENAI_API_KEY_ENV = "IMGPIPE_OPENAI_API_KEY"
OPENAI_MODEL_ENV = "IMGPIPE_OPENAI_MODEL"

Deployment = Literal["local", "external"]
DEPLOYMENTS: tuple[Deployment, ...] = ("local", "external")
GpuApi = Literal["native", "openai"]
GPU_APIS: tuple[GpuApi, ...] = ("native", "openai")


class EnvironmentValueError(ValueError):
    """An ``IMGPIPE_*`` variable holds a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Environment:
    # IMGPIPE_HOME: state folder; None means ./.imgpipe
    home: str | None
    # IMGPIPE_DEPLOYMENT: "local" (managed GPU servers on this machine, the default) or "external"
    # (attach to IMGPIPE_GPU_ENDPOINTS only)
    deployment: Deployment
    # IMGPIPE_MODEL_PATH: local checkpoint; None means the tiny random test model
    model_path: str | None
    # IMGPIPE_MAX_NEW_TOKENS: overrides the profile's max_new_tokens (quick checks of a real model)
    max_new_tokens: int | None
    # IMGPIPE_GPU_TOKEN: bearer token of the GPU servers
    gpu_token: str | None
    # IMGPIPE_GPU_DEVICES: devices of the managed servers; None means every visible GPU, else cpu
    gpu_devices: tuple[str, ...] | None
    # IMGPIPE_GPU_BASE_PORT: first managed server's port (0: any free port per server)
    gpu_base_port: int | None
    # IMGPIPE_GPU_ENDPOINTS: servers on other machines (external deployment; shown by `imgpipe status`)
    gpu_endpoints: tuple[str, ...]
    # IMGPIPE_ALLOWED_NETWORKS: CIDRs exempt from the fetcher's private-address block
    allowed_networks: tuple[str, ...]
    # IMGPIPE_CORPUS_DIR: drop directory of the corpus sensor
    corpus_dir: str | None
    # IMGPIPE_TIMEZONE: time zone of the nightly schedule
    timezone: str | None
    # IMGPIPE_NIGHTLY_SHARDS: shards the nightly schedule requests
    nightly_shards: int | None
    # IMGPIPE_NIGHTLY_AUTOSTART / IMGPIPE_THROTTLE_AUTOSTART: start the schedule / sensor running
    nightly_autostart: bool
    throttle_autostart: bool
    # IMGPIPE_DATABASE_URL / IMGPIPE_DAGSTER_DATABASE_URL: the project's and Dagster's database; None: embedded
    database_url: str | None
    dagster_database_url: str | None
    # IMGPIPE_PG_SHARED_BUFFERS_MB as written (store/embedded.py checks it when the server starts)
    pg_shared_buffers_mb: str | None
    # IMGPIPE_CONTACT_URL: where site owners reach the operator, sent in the User-Agent of every download
    contact_url: str | None = None
    # IMGPIPE_IGNORE_ROBOTS_TXT: only for corpora whose hosts gave permission; robots.txt is obeyed otherwise
    ignore_robots_txt: bool = False
    # IMGPIPE_EXPORT_URI: base of the result files (a directory or a pyarrow URI); None: $IMGPIPE_HOME/export
    export_uri: str | None = None
    # IMGPIPE_RUN_MAX_RUNTIME_S: a shard run older than this is stopped by run monitoring (the backstop for
    # a run worker that died unnoticed); None: the default of jobs.py
    run_max_runtime_s: int | None = None
    # IMGPIPE_K8S_RUN_POD: run pod file of the Kubernetes deployment (deploy/k8s/run_pod.yaml)
    k8s_run_pod: str | None = None
    # IMGPIPE_PROMPT: the prompt (resources/prompts/<name>.txt) of the analysis; None means analysis_v1
    prompt: str | None = None
    # IMGPIPE_IMAGE_STORE: where runs keep the images they sent to the model (IMAGE_STORE_DEFAULT: under
    # IMGPIPE_HOME, see paths.image_store_dir); None: off
    image_store: str | None = None
    # IMGPIPE_GPU_API: how runs talk to the GPU tier: "native" (/v1/analyze) or "openai" (chat completions)
    gpu_api: GpuApi = "native"
    # IMGPIPE_OPENAI_API_KEY: bearer key of OpenAI-compatible servers (handed to Dagster as an EnvVar)
    openai_api_key: str | None = None
    # IMGPIPE_OPENAI_MODEL: the served model name to request; None: the first of each server's /v1/models
    openai_model: str | None = None


def _text(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _list(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in environ.get(name, "").split(",") if item.strip())


def _int(environ: Mapping[str, str], name: str, minimum: int) -> int | None:
    value = _text(environ, name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise EnvironmentValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise EnvironmentValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes")


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    environ = os.environ if environ is None else environ
    deployment = (_text(environ, DEPLOYMENT_ENV) or "local").lower()
    if deployment not in DEPLOYMENTS:
        raise EnvironmentValueError(f"{DEPLOYMENT_ENV} must be one of {', '.join(DEPLOYMENTS)}, got {deployment!r}")
    gpu_api = (_text(environ, GPU_API_ENV) or "native").lower()
    if gpu_api not in GPU_APIS:
        raise EnvironmentValueError(f"{GPU_API_ENV} must be one of {', '.join(GPU_APIS)}, got {gpu_api!r}")
    return Environment(
        home=_text(environ, HOME_ENV),
        deployment=deployment,  # type: ignore[arg-type]
        model_path=_text(environ, MODEL_PATH_ENV),
        max_new_tokens=_int(environ, MAX_NEW_TOKENS_ENV, 1),
        gpu_token=_text(environ, GPU_TOKEN_ENV),
        gpu_devices=_list(environ, GPU_DEVICES_ENV) or None,
        gpu_base_port=_int(environ, GPU_BASE_PORT_ENV, 0),
        gpu_endpoints=tuple(url.rstrip("/") for url in _list(environ, GPU_ENDPOINTS_ENV)),
        allowed_networks=_list(environ, ALLOWED_NETWORKS_ENV),
        corpus_dir=_text(environ, CORPUS_DIR_ENV),
        timezone=_text(environ, TIMEZONE_ENV),
        nightly_shards=_int(environ, NIGHTLY_SHARDS_ENV, 0),
        nightly_autostart=_flag(environ, NIGHTLY_AUTOSTART_ENV),
        throttle_autostart=_flag(environ, THROTTLE_AUTOSTART_ENV),
        database_url=_text(environ, DATABASE_URL_ENV),
        dagster_database_url=_text(environ, DAGSTER_DATABASE_URL_ENV),
        pg_shared_buffers_mb=_text(environ, PG_SHARED_BUFFERS_ENV),
        contact_url=_text(environ, CONTACT_URL_ENV),
        ignore_robots_txt=_flag(environ, IGNORE_ROBOTS_TXT_ENV),
        export_uri=_text(environ, EXPORT_URI_ENV),
        run_max_runtime_s=_int(environ, RUN_MAX_RUNTIME_ENV, 60),
        k8s_run_pod=_text(environ, K8S_RUN_POD_ENV),
        prompt=_text(environ, PROMPT_ENV),
        image_store=_image_store(environ),
        gpu_api=gpu_api,  # type: ignore[arg-type]
        openai_api_key=_text(environ, OPENAI_API_KEY_ENV),
        openai_model=_text(environ, OPENAI_MODEL_ENV),
    )


def _image_store(environ: Mapping[str, str]) -> str | None:
    value = _text(environ, IMAGE_STORE_ENV)
    if value is None or value.lower() in ("0", "false", "no", "off"):
        return None
    return IMAGE_STORE_DEFAULT if value.lower() in IMAGE_STORE_DEFAULT_VALUES else value
