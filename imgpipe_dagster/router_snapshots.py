"""Runs publish their router's state (breakers per GPU server) as small JSON files under
$IMGPIPE_HOME/router; `imgpipe status` reads the fresh ones back. The breaker lives inside each run's
process, so a file per run is how another process sees it. No Dagster, no CLI here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from imgpipe_dagster.paths import imgpipe_home

# A run rewrites its snapshot every progress interval; older ones belong to runs that ended.
ROUTER_SNAPSHOT_MAX_AGE_S = 120.0


def router_snapshot_dir() -> Path:
    return imgpipe_home() / "router"


def write_router_snapshot(run_id: str, snapshot: dict | None) -> None:
    """Publish a run's router snapshot (``ShardRunner`` progress summaries carry it as "router")."""
    if not snapshot:
        return
    folder = router_snapshot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{run_id}.json"
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps({"written_at": time.time(), "router": snapshot}, default=str))
    temporary.replace(target)  # readers never see half a file


def read_breakers(max_age_s: float = ROUTER_SNAPSHOT_MAX_AGE_S) -> dict[str, str]:
    """Endpoint URL -> worst breaker state over the runs that published a fresh snapshot."""
    rank = {"closed": 0, "half-open": 1, "open": 2}
    found: dict[str, str] = {}
    folder = router_snapshot_dir()
    if not folder.is_dir():
        return found
    now = time.time()
    for path in folder.glob("*.json"):
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if now - float(body.get("written_at", 0)) > max_age_s:
            continue
        for endpoint in body.get("router", {}).get("endpoints", []):
            url = str(endpoint.get("url", "")).rstrip("/")
            state = str(endpoint.get("breaker", {}).get("state", ""))
            if url and state in rank and rank[state] >= rank.get(found.get(url, "closed"), 0):
                found[url] = state
    return found
