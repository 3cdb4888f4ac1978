"""Run config files checked the way a launch would check them, but said in one line per problem.

``dagster job launch -c FILE`` meets a wrong type, an unknown key or an unknown profile with about
sixty lines of traceback before Dagster's own clear message. ``problems_in`` loads and merges the
files as ``-c A -c B`` does, validates the result against the job's config schema with Dagster's own
validator, then the merged profile values against the profile models (ranges and orderings that a
run would only refuse when it starts), and returns each problem as one line.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from dagster import DagsterInvalidConfigError, validate_run_config

from imgpipe_dagster.assets.config import DEFAULT_PROFILE, ImageAnalysisConfig
from imgpipe_dagster.environment import GPU_TOKEN_ENV
from imgpipe_dagster.jobs import analysis_job_name
from imgpipe_dagster.profiles import PROFILE_NAMES, ProfileError


def problems_in(files: Sequence[str | Path], job_name: str | None = None) -> list[str]:
    """One line per problem of the run config the ``files`` make together; [] when a launch takes it."""
    merged: dict[str, Any] = {}
    for file in files:
        try:
            loaded = yaml.safe_load(Path(file).read_text()) or {}
        except OSError as error:
            return [f"{file}: cannot be read ({error.strerror or error})"]
        except yaml.YAMLError as error:
            return [f"{file}: not YAML: {str(error).splitlines()[0]}"]
        if not isinstance(loaded, dict):
            return [f"{file}: a run config is a mapping (ops:, resources:), not a {type(loaded).__name__}"]
        merged = _merged(merged, loaded)
    op_config = (merged.get("ops") or {}).get("image_analysis", {}).get("config") or {}
    profile = op_config.get("profile") if isinstance(op_config, dict) else None
    if profile is not None and profile not in PROFILE_NAMES:
        return [f"unknown profile {profile!r} at ops.image_analysis.config.profile; choose one of "
                f"{', '.join(PROFILE_NAMES)}"]  # fmt: skip
    token = (((merged.get("resources") or {}).get("gpu_model") or {}).get("config") or {}).get("token")
    if isinstance(token, str):
        # run config is stored with the run and shown in the UI: only a variable's name belongs there
        return [f"resources.gpu_model.config.token is written out, and run config is stored and shown in "
                f"clear: write token: {{env: {GPU_TOKEN_ENV}}} instead"]  # fmt: skip
    with warnings.catch_warnings():  # loading the definitions warns about beta parameters: noise here
        warnings.simplefilter("ignore")
        from imgpipe_dagster.definitions import defs

        job = defs.resolve_job_def(job_name or analysis_job_name(profile or DEFAULT_PROFILE))
    try:
        validate_run_config(job, merged)
    except DagsterInvalidConfigError as error:
        return [_one_line(problem.message) for problem in error.errors]
    try:
        ImageAnalysisConfig(**op_config).resolve()
    except ProfileError as error:
        return [str(error)]
    return []


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, mappings merged key by key (as repeated ``-c`` files are)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _one_line(message: str) -> str:
    """Dagster's message with its path written as dotted keys (root:ops:x -> ops.x), line breaks folded."""
    dotted = _DAGSTER_PATH.sub(lambda found: found.group(1).replace(":", "."), message)
    dotted = dotted.split(" Stack Trace:", 1)[0]  # a failed environment variable lookup appends one
    # an unknown key's message goes on to print the whole schema: the profile files list the keys
    dotted = dotted.split(' Expected: "', 1)[0].rstrip(".") + (
        " (profiles/medium.yaml lists every key)" if ' Expected: "' in dotted else "")
    return " ".join(dotted.split())


_DAGSTER_PATH = re.compile(r"\broot:((?:[\w\[\]-]+:?)+)")
