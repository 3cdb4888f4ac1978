"""Which GPU servers there are: the one discovery function for everything that watches them
(the throttle sensor, ``imgpipe status``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher


def discover_endpoints(
    configured: Sequence[str] = (), *, managed: bool = True, records_dir: Path | None = None
) -> list[str]:
    """Base URLs, without repeats: with ``managed``, the servers recorded under ``records_dir``
    (default ``$IMGPIPE_HOME/gpu-servers``) whose process lives; then ``configured`` (servers on
    other machines). A recorded server that is not running is cold, not down: it is left out."""
    urls: list[str] = []
    if managed:
        for record in GpuServerLauncher(records_dir).live_records():
            if record.get("port"):
                urls.append(record["url"])
    return list(dict.fromkeys(url.rstrip("/") for url in [*urls, *configured]))
