"""The throttle's logic without Dagster: the decision (decide.py), the SQL it reads and stores
(queries.py) and the GPU /health probes (health.py). imgpipe_dagster/sensors/throttle.py is the
thin Dagster sensor around it."""

from imgpipe_dagster.throttle.decide import (
    Backlog,
    Decision,
    GpuHealth,
    ProfileLimits,
    ThrottleSettings,
    ThrottleState,
    TickInputs,
    WindowStats,
    assess,
    decide,
)

__all__ = [
    "Backlog", "Decision", "GpuHealth", "ProfileLimits", "ThrottleSettings", "ThrottleState", "TickInputs",
    "WindowStats", "assess", "decide",
]  # fmt: skip
