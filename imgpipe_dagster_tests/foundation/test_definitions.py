"""The code location loads and validates as `dagster definitions validate` does, and its shape is
pinned so an unintended lineage or job change shows up in review."""

import os
import subprocess
import sys
from pathlib import Path

from dagster import AssetKey

from imgpipe_dagster.definitions import defs
from imgpipe_dagster.store.database import DAGSTER_DATABASE_URL_ENV, sqlalchemy_url

REPO = Path(__file__).resolve().parents[2]


def test_definitions_validate_like_the_cli(dagster_database_url):
    # The project's dagster.yaml (picked up from the checkout) reads its storage URL from the environment.
    env = {**os.environ, DAGSTER_DATABASE_URL_ENV: sqlalchemy_url(dagster_database_url)}
    result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-m",
                             "imgpipe_dagster.definitions"], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_asset_graph_and_jobs_snapshot():
    graph = defs.resolve_asset_graph()
    edges = sorted(
        (parent.to_user_string(), key.to_user_string())
        for key in graph.get_all_asset_keys()
        for parent in graph.get(key).parent_keys
    )
    assert edges == [("image_analysis", "progress_report"), ("url_corpus", "image_analysis")]
    checks = sorted(k.name for k in graph.asset_check_keys if k.asset_key == AssetKey("image_analysis"))
    assert checks == ["analyses_parse", "every_url_final", "failure_ratio"]
    assert [k.name for k in graph.asset_check_keys if k.asset_key == AssetKey("url_corpus")] == [
        "partitions_match_shards"
    ]
    jobs = sorted(job.name for job in defs.resolve_all_job_defs() if not job.name.startswith("__"))
    assert {"analyze_conservative", "analyze_medium", "analyze_aggressive", "ingest_corpus"} <= set(jobs)
