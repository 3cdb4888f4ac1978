"""The one Definitions object of the code location, with the resources of one deployment.

``IMGPIPE_DEPLOYMENT`` chooses the resource set (read once, through ``environment.py``):

- ``local`` (default): the GPU servers run on this machine, managed by the ``gpu_model`` resource
  (``IMGPIPE_MODEL_PATH``, ``IMGPIPE_GPU_DEVICES``, ``IMGPIPE_GPU_BASE_PORT``, ``IMGPIPE_MAX_NEW_TOKENS``);
- ``external``: runs only attach to the servers in ``IMGPIPE_GPU_ENDPOINTS`` and to those registered
  in the project database (started on GPU machines with ``imgpipe gpu-server start``).

Both deployments also use the live GPU servers of the registry (``gpu_servers``, docs/GPU_TIER.md).

Both: ``IMGPIPE_GPU_API`` (native or openai), ``IMGPIPE_OPENAI_API_KEY`` and ``IMGPIPE_OPENAI_MODEL``
(the OpenAI-compatible tier, docs/GPU_TIER.md),
``IMGPIPE_GPU_TOKEN`` (handed over as an ``EnvVar``, so the UI shows its name, never its value),
``IMGPIPE_ALLOWED_NETWORKS``, ``IMGPIPE_CONTACT_URL`` and ``IMGPIPE_IGNORE_ROBOTS_TXT`` for the fetcher, and the project database (``IMGPIPE_DATABASE_URL`` or the
embedded server). Run config may still override any resource field per run.
"""

from __future__ import annotations

import warnings
from typing import Any

from dagster import BetaWarning, Definitions, EnvVar, with_source_code_references

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.assets.corpus import url_corpus
from imgpipe_dagster.assets.export import analysis_export
from imgpipe_dagster.assets.report import progress_report
from imgpipe_dagster.environment import (
    GPU_TOKEN_ENV,
    OPENAI_API_KEY_ENV,
    Environment,
    read_environment,
)
from imgpipe_dagster.executor import shard_run_executor
from imgpipe_dagster.jobs import ANALYSIS_JOBS, INGEST_JOB, REPORT_JOB
from imgpipe_dagster.requeue_job import requeue_failed
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.resources.gpu_model import DEFAULT_BASE_PORT
from imgpipe_dagster.schedules import SCHEDULES
from imgpipe_dagster.sensors import SENSORS


def resources_by_deployment(env: Environment) -> dict[str, dict[str, Any]]:
    """Each deployment's resources, filled from the environment."""
    token = EnvVar(GPU_TOKEN_ENV) if env.gpu_token else None
    # how runs talk to the GPU tier (native or OpenAI chat completions); the key travels as an EnvVar
    tier = {"api": env.gpu_api, "api_key": EnvVar(OPENAI_API_KEY_ENV) if env.openai_api_key else None,
            "openai_model": env.openai_model}  # fmt: skip
    shared = {
        "postgres": PostgresResource(),
        "fetcher": FetcherResource(
            allowed_networks=list(env.allowed_networks),
            contact_url=env.contact_url or "",
            obey_robots_txt=not env.ignore_robots_txt,
        ),
    }
    return {
        "local": {
            **shared,
            "gpu_model": GpuModelResource(
                mode="managed",
                model_path=env.model_path,
                devices=list(env.gpu_devices) if env.gpu_devices else None,
                base_port=DEFAULT_BASE_PORT if env.gpu_base_port is None else env.gpu_base_port,
                max_new_tokens=env.max_new_tokens,
                token=token,
                **tier,
            ),
        },
        "external": {
            **shared,
            "gpu_model": GpuModelResource(mode="external", endpoints=list(env.gpu_endpoints), token=token, **tier),
        },
    }


def deployment_resources(env: Environment) -> dict[str, Any]:
    # external without listed endpoints uses the servers registered in the project database only
    return resources_by_deployment(env)[env.deployment]


def _with_code_references(assets: list) -> list:
    """Each asset links to its source file and line in the UI. Code references are a beta feature of
    Dagster 1.13, used on purpose: its notice would repeat in every process loading the location."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)
        return list(with_source_code_references(assets))


defs = Definitions(
    assets=_with_code_references([url_corpus, image_analysis, progress_report, analysis_export]),
    jobs=[*ANALYSIS_JOBS.values(), INGEST_JOB, REPORT_JOB, requeue_failed],
    sensors=SENSORS,
    schedules=SCHEDULES,
    resources=deployment_resources(read_environment()),
    # in-process inside a Celery worker's daemonic pool process, Dagster's default elsewhere
    executor=shard_run_executor,
)
