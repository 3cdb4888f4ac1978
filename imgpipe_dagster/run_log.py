"""Engine loggers into the Dagster run log for the duration of a run's body.

The engine logs on plain Python loggers (it knows nothing of Dagster); a run's operator reads the run
log. While the block runs, records of the named loggers at INFO and above are passed on to the run's
logger at their own level, so the router's "waiting" and "resumed" lines and the breaker's and
limiter's changes appear next to the progress lines.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

# The GPU routing decisions (router, breakers, limiters) of the run
FORWARDED_LOGGERS = ("imgpipe.resilience",)


class _ToRunLog(logging.Handler):
    def __init__(self, run_log: logging.Logger | logging.LoggerAdapter) -> None:
        super().__init__(logging.INFO)
        self.run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_log.log(record.levelno, record.getMessage())
        except Exception:  # a log line must never break the run
            self.handleError(record)


@contextlib.contextmanager
def forwarded_to_run_log(
    run_log: logging.Logger | logging.LoggerAdapter, names: Sequence[str] = FORWARDED_LOGGERS
) -> Iterator[None]:
    handler = _ToRunLog(run_log)
    loggers = [logging.getLogger(name) for name in names]
    previous_levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the root's WARNING would drop the INFO lines before the handler
    try:
        yield
    finally:
        for logger, level in zip(loggers, previous_levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
