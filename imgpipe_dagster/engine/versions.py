"""The analysis version: a stable name for everything an analysis depends on besides the image.

Two things decide what the model answers for an image: the prompt (its exact text and the chat turn
around it, gpu_server/prompts.py) and the model (its identity: the checkpoint path as configured, or the
tiny test model). Their hash names the version; the Dagster asset takes it as its code version, so a
prompt or model change shows the analysed shards as out of date, and results are stored per version
(store/versions.py). Generation settings such as max_new_tokens are profile values and are left out:
changing a profile does not make old analyses stale.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from imgpipe_dagster.gpu_server.prompts import SYSTEM_TEXT, load_prompt

# The tiny random test model's identity wherever it was built (its text is noise anyway).
TINY_MODEL_IDENTITY = "tiny-random-qwen2-vl"


@dataclass(frozen=True)
class AnalysisVersion:
    prompt_name: str
    prompt_version: str  # "<name>@<hash of the text>" as the GPU server reports it
    model: str  # the model identity
    digest: str  # 12 hex digits over prompt text and model identity

    @property
    def label(self) -> str:
        """The version as stored and shown: "<prompt name>:<digest>"."""
        return f"{self.prompt_name}:{self.digest}"


def model_identity(model_path: str | None, tiny: bool | None = None) -> str:
    """The configured checkpoint path, or the tiny test model's fixed name. ``tiny`` when the caller
    knows; else a path is looked at (a missing directory is a real model on another machine)."""
    if not model_path:
        return TINY_MODEL_IDENTITY
    if tiny is None:
        from imgpipe_dagster.gpu_server.tiny_model import is_tiny_model

        tiny = is_tiny_model(model_path)
    return TINY_MODEL_IDENTITY if tiny else model_path.rstrip("/")


def analysis_version(prompt_name: str, model: str, prompts_directory: str | None = None) -> AnalysisVersion:
    """The version of analyses made with this prompt and model identity (see ``model_identity``)."""
    prompt = load_prompt(prompt_name, prompts_directory)
    material = json.dumps({"system": SYSTEM_TEXT, "prompt": prompt.text, "model": model}, sort_keys=True)
    digest = hashlib.sha256(material.encode("utf-8")).hexdigest()[:12]
    return AnalysisVersion(prompt_name=prompt.name, prompt_version=prompt.version, model=model, digest=digest)
