"""A listening port checked before a long start-up, so a taken port fails in one clear line."""

from __future__ import annotations

import socket

from imgpipe_dagster.store.errors import ConfigurationError


def ensure_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(
                f"port {port} on {host} is in use ({exc.strerror}); stop what holds it or pass --port"
            ) from exc
