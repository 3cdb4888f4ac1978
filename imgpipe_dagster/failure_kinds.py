"""Which run failures a retry can fix: a transient cause (a GPU outage, a lost connection, a crashed
worker) may pass on a second try; a permanent one (the run's own config, a programming error) fails
the same way every time, so it is never retried.

No Dagster here: the asset marks its permanent failures with ``PERMANENT_FAILURE_KEY`` in the
failure's metadata, and the run-failure sensor reads the marker and the error class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Metadata key (and its value: why) that the asset sets on a failure no retry can fix.
PERMANENT_FAILURE_KEY = "imgpipe/permanent_failure"
CONFIG_ERROR = "config error"

# Error classes that say the code or its config is wrong, not the world around it.
PERMANENT_ERROR_CLASSES = frozenset({
    "DagsterInvalidConfigError", "DagsterTypeCheckDidNotPass", "DagsterInvalidDefinitionError",
    "ProfileError", "EnvironmentValueError", "CorpusInputError",
    "SyntaxError", "ImportError", "ModuleNotFoundError", "NameError", "TypeError", "AttributeError",
})  # fmt: skip


def permanent_reason(error_class: str | None, failure_metadata: Mapping[str, Any] | None) -> str | None:
    """Why a retry cannot help (a short phrase), or None when the failure may be transient."""
    marked = (failure_metadata or {}).get(PERMANENT_FAILURE_KEY)
    if marked:
        return str(marked)
    if error_class in PERMANENT_ERROR_CLASSES:
        return f"{error_class} (the code or its config, not the network or the GPUs)"
    return None
