"""The jobs the sensors and the nightly schedule request, defined once.

Dagster matches a sensor's target jobs to the Definitions' jobs by object identity: two
``define_asset_job("analyze_medium", ...)`` objects with the same name fail to load
("Duplicate definition found"). So the jobs live here and definitions.py imports them.
Assets are named by key, so this module imports no asset module.
"""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from imgpipe_dagster.assets.config import PROFILE_TAG
from imgpipe_dagster.deploy.k8s import run_pod_tags
from imgpipe_dagster.environment import read_environment
from imgpipe_dagster.profiles import PROFILE_NAMES, profile_run_config

ANALYSIS = AssetSelection.assets("image_analysis")
# Backstop for a run whose worker died unnoticed (a Celery worker killed mid-run leaves its run STARTED):
# run monitoring stops a shard run older than this. A 10,000-URL shard takes minutes to an hour.
DEFAULT_MAX_RUNTIME_S = 6 * 3600
MAX_RUNTIME_TAG = "dagster/max_runtime"

# Dagster's run queue starts higher priorities first: a retry, then manual runs and the throttle's
# (0, Dagster's default), then the nightly set.
PRIORITY_TAG = "dagster/priority"
RETRY_PRIORITY = 10
NIGHTLY_PRIORITY = -10


def analysis_job_name(profile: str) -> str:
    """The job that runs image_analysis with a profile's preset: ``analyze_<profile>``."""
    return f"analyze_{profile}"


def analysis_job(profile: str):
    """`analyze_<profile>`: image_analysis over chosen shards, with that profile's run config preset."""
    return define_asset_job(
        analysis_job_name(profile),
        selection=ANALYSIS,
        config=profile_run_config(profile),
        description=f"Analyse shards with the {profile} profile (profiles/{profile}.yaml).",
        tags=analysis_job_tags(profile),
    )


def analysis_job_tags(profile: str) -> dict[str, str]:
    """The profile tag, the max-runtime backstop and, on Kubernetes, the run pod (deploy/k8s.py)."""
    env = read_environment()
    max_runtime_s = env.run_max_runtime_s or DEFAULT_MAX_RUNTIME_S
    return {
        PROFILE_TAG: profile,
        MAX_RUNTIME_TAG: str(max_runtime_s),
        **run_pod_tags(profile, env.k8s_run_pod),
    }


ANALYSIS_JOBS = {name: analysis_job(name) for name in PROFILE_NAMES}
INGEST_JOB = define_asset_job(
    "ingest_corpus",
    selection=AssetSelection.assets("url_corpus"),
    description="Ingest URL files into the corpus and add their shards.",
)
REPORT_JOB = define_asset_job("refresh_progress_report", selection=AssetSelection.assets("progress_report"))
