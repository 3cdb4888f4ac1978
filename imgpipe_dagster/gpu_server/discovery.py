"""Which GPU servers there are: the one discovery function for everything that watches or uses them
(the gpu_model resource of a run, the throttle sensor, ``imgpipe status``).

Three sources, merged without repeats: the servers this machine's launcher recorded and whose process
lives, the live set of the project database's registry (servers on any machine that beat within
``store.gpu_registry.LIVE_WINDOW_S``), and the hand-listed endpoints (``IMGPIPE_GPU_ENDPOINTS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.store.gpu_registry import LIVE_WINDOW_S, live_server_urls


def discover_endpoints(
    configured: Sequence[str] = (),
    *,
    managed: bool = True,
    records_dir: Path | None = None,
    registry_url: str | None = None,
    model: str | None = None,
    window_s: float = LIVE_WINDOW_S,
    ready_only: bool = False,
) -> list[str]:
    """Base URLs, without repeats: with ``managed``, the servers recorded under ``records_dir``
    (default ``$IMGPIPE_HOME/gpu-servers``) whose process lives; with ``registry_url``, the registry's
    live servers (of ``model`` when given; with ``ready_only``, those whose model has loaded); then
    ``configured`` (servers listed by hand). A recorded server that is not running is cold, not down:
    it is left out."""
    urls: list[str] = []
    if managed:
        for record in GpuServerLauncher(records_dir).live_records():
            if record.get("port"):
                urls.append(record["url"])
    if registry_url:
        urls.extend(live_server_urls(registry_url, window_s, model=model, ready_only=ready_only))
    return list(dict.fromkeys(url.rstrip("/") for url in [*urls, *configured]))
