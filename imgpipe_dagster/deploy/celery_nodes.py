"""The live Celery nodes of the instance's ``CeleryRunLauncher``, and the queue each new shard run takes.

A node is a Celery worker that consumes a queue of its own besides the launcher's default queue (see
docs/DEPLOY.md). The throttle asks the workers themselves (Celery's broadcast ``inspect``), so a node joins
by starting its worker and leaves by stopping (or dying): a dead node gets no new run. With any other run
launcher, or when no worker answers in time, nothing is placed and runs take the launcher's default.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from dagster import DagsterInstance

from imgpipe_dagster.throttle.placement import QUEUE_TAG, Node, place

# each of the two broadcasts waits this long for the workers' answers (a throttle tick pays both)
INSPECT_TIMEOUT_S = 0.5

log = logging.getLogger(__name__)


def live_nodes(instance: DagsterInstance, timeout_s: float = INSPECT_TIMEOUT_S) -> tuple[Node, ...]:
    """One Node per queue that a live worker consumes, other than the launcher's default queue; its slots
    are the pool sizes of the workers consuming it. Empty unless the run launcher is Celery's."""
    launcher = instance.run_launcher
    app = getattr(launcher, "celery", None)
    default_queue = getattr(launcher, "default_queue", None)
    if app is None or default_queue is None:
        return ()
    try:
        inspector = app.control.inspect(timeout=timeout_s)
        queues_by_worker = inspector.active_queues() or {}
        stats_by_worker = inspector.stats() or {}
    except Exception as error:  # a broker that is down must not stop the throttle: no placement this tick
        log.warning("Celery nodes unknown (%s: %s); runs take the default queue", type(error).__name__, error)
        return ()
    slots: Counter[str] = Counter()
    for worker, queues in queues_by_worker.items():
        pool = (stats_by_worker.get(worker) or {}).get("pool") or {}
        for queue in queues:
            name = queue.get("name")
            if name and name != default_queue:
                slots[name] += int(pool.get("max-concurrency") or 1)
    return tuple(Node(queue, count) for queue, count in sorted(slots.items()))


def queues_for(
    instance: DagsterInstance, runs_in_flight: Sequence, shards: Sequence[str], turn: int
) -> dict[str, str] | None:
    """Shard -> the queue of the live node with the most free slots, for the shards that find a free slot
    (see throttle/placement.py); None without Celery nodes (no placement)."""
    if not shards:
        return None
    nodes = live_nodes(instance)
    load = Counter(run.tags[QUEUE_TAG] for run in runs_in_flight if QUEUE_TAG in run.tags)
    return place(shards, nodes, load, turn)
