"""The analysis version this deployment produces: the configured prompt (``IMGPIPE_PROMPT``) and model
(``IMGPIPE_MODEL_PATH``, else the tiny test model), named by engine/versions.py. The image_analysis
asset takes it as its code version; `imgpipe verify` checks it unless told another."""

from __future__ import annotations

from imgpipe_dagster.engine.versions import AnalysisVersion, analysis_version, model_identity
from imgpipe_dagster.environment import Environment, read_environment
from imgpipe_dagster.gpu_server.prompts import DEFAULT_PROMPT


def configured_prompt(env: Environment | None = None) -> str:
    return (env or read_environment()).prompt or DEFAULT_PROMPT


def configured_analysis_version(env: Environment | None = None) -> AnalysisVersion:
    env = env or read_environment()
    return analysis_version(configured_prompt(env), model_identity(env.model_path))
