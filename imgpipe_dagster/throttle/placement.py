"""Which node runs a shard: the live node with the most free run slots (round-robin among equals).

A node is one run-worker machine: a Celery worker consuming its own queue (see docs/DEPLOY.md). Its
slots are the runs it executes at once (the worker's concurrency); its load is the runs in flight
already routed to its queue. No Dagster here: the sensor hands in what it read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# dagster-celery's run tag that routes a run to a queue (dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG),
# spelled out so the throttle does not need dagster-celery installed.
QUEUE_TAG = "dagster-celery/queue"


@dataclass(frozen=True)
class Node:
    queue: str
    # runs the node executes at once (a Celery worker's pool size)
    slots: int


def place(
    shards: Sequence[str], nodes: Sequence[Node], load: Mapping[str, int], turn: int = 0
) -> dict[str, str] | None:
    """Shard -> queue, for as many shards as the nodes have free slots; the rest wait for a later tick
    (a run parked in a busy node's queue would sit STARTING, and die with that node). Each shard goes to the
    node with the most free slots after the shards placed before it; among equals the order rotates by
    ``turn`` (the sensor passes its decision id), so equal nodes take turns from tick to tick.
    No nodes: None (no placement: every shard takes the launcher's default queue)."""
    if not nodes:
        return None
    free = {node.queue: node.slots - load.get(node.queue, 0) for node in nodes}
    rotated = [nodes[(turn + i) % len(nodes)] for i in range(len(nodes))]
    placed: dict[str, str] = {}
    for shard in shards:
        best = max(rotated, key=lambda node: free[node.queue])  # first among equals wins
        if free[best.queue] <= 0:
            break
        placed[shard] = best.queue
        free[best.queue] -= 1
        # the node just used goes last among equals: round-robin within the tick as well
        rotated.remove(best)
        rotated.append(best)
    return placed
