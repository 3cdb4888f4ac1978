"""Complete resilience settings for tests: the medium profile (profiles/medium.yaml) through the
one mapping (imgpipe_dagster.settings_map), with the changes a test names."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from imgpipe_dagster.resilience import BreakerSettings, LimiterSettings, RetrySettings
from imgpipe_dagster.settings_map import profile_engine_settings


def medium_limiter(**changes: Any) -> LimiterSettings:
    return replace(profile_engine_settings("medium").limiter, **changes)


def medium_breaker(**changes: Any) -> BreakerSettings:
    return replace(profile_engine_settings("medium").breaker, **changes)


def medium_retry(**changes: Any) -> RetrySettings:
    return replace(profile_engine_settings("medium").fetch_retry, **changes)
