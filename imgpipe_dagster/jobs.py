"""The jobs the sensors and the nightly schedule request, defined once.

Dagster matches a sensor's target jobs to the Definitions' jobs by object identity: two
``define_asset_job("analyze_medium", ...)`` objects with the same name fail to load
("Duplicate definition found"). So the jobs live here and definitions.py imports them.
Assets are named by key, so this module imports no asset module.
"""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from imgpipe_dagster.assets.config import PROFILE_TAG
from imgpipe_dagster.profiles import PROFILE_NAMES, profile_run_config

ANALYSIS = AssetSelection.assets("image_analysis")

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
        tags={PROFILE_TAG: profile},
    )


ANALYSIS_JOBS = {name: analysis_job(name) for name in PROFILE_NAMES}
INGEST_JOB = define_asset_job(
    "ingest_corpus",
    selection=AssetSelection.assets("url_corpus"),
    description="Ingest URL files into the corpus and add their shards.",
)
REPORT_JOB = define_asset_job("refresh_progress_report", selection=AssetSelection.assets("progress_report"))
