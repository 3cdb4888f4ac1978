"""Reading the response headers that steer the fetch: Retry-After and the X-Robots-Tag AI opt-out."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterable

# directives by which a site asks that its images not be used by AI systems
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})

# a Retry-After beyond a day is treated as a day: the retry policy has its own ceiling anyway
_MAX_RETRY_AFTER_S = 86_400.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(delay, 0.0), _MAX_RETRY_AFTER_S)


def robots_opt_out(values: Iterable[str]) -> str | None:
    """The opt-out directive found in X-Robots-Tag header values, or None.

    A directive may be scoped to a crawler ("somebot: noai"); we honour it whatever the scope, since
    an opt-out addressed to any AI crawler states the site's wish about AI use of the image.
    """
    for value in values:
        for part in value.split(","):
            directive = part.strip().lower()
            if ":" in directive:
                directive = directive.rsplit(":", 1)[1].strip()
            for word in directive.split():
                if word in OPT_OUT_DIRECTIVES:
                    return word
    return None
