"""Errors the CLI shows as one line with what to do, instead of a traceback."""


class ConfigurationError(RuntimeError):
    """A setting or the environment is wrong; the message says what to change."""
