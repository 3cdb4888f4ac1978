"""Duplicate images analysed once per analysis version.

Web corpora repeat the same file under many URLs. Before an image goes to the GPU tier its sha256 is
looked up: within the run, the first image with those bytes (the leader) goes to the GPU and the later
ones wait for its answer; across runs, an analysis already stored under the same version is reused
(store.versions.find_reusable, looked up in batches). A URL that reuses an analysis still gets its own
result row, marked with ``reused_from``. If the leader's analysis fails, the next image with the
same bytes is sent itself. Two runs meeting the same new image at the same moment may both send it:
duplicates across concurrent runs are saved only once the first analysis is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from imgpipe_dagster.engine.outcomes import fetch_columns
from imgpipe_dagster.fetch import FetchResult
from imgpipe_dagster.store.versions import REUSED_COLUMNS, ReusableAnalysis
from imgpipe_dagster.store.work import ClaimedUrl, UrlOutcome

log = logging.getLogger("imgpipe.engine")

Lookup = Callable[[Sequence[str]], Awaitable[dict[str, ReusableAnalysis]]]


class DuplicateImages:
    """One run's view of which images were already analysed, by sha256."""

    def __init__(self, lookup: Lookup, *, max_batch: int = 500, remembered: int = 4096) -> None:
        self._lookup = lookup  # stored analyses of digests under the run's version
        self.max_batch = max_batch
        self.remembered = remembered
        self._known: OrderedDict[str, ReusableAnalysis] = OrderedDict()  # analyses met in this run
        self._leaders: dict[str, asyncio.Future] = {}  # digests on their way to the GPU
        self._queued: list[tuple[str, asyncio.Future]] = []  # digests waiting for the batched lookup
        self._flushing: asyncio.Task | None = None
        self.reused = 0  # URLs that reused an analysis
        self.lookups = 0  # batched queries run

    async def reusable(self, sha256: str) -> ReusableAnalysis | None:
        """An analysis to reuse for these bytes, or None: then the caller sends the image and must
        ``settle`` the digest with its analysis (or None) once the GPU answered."""
        while True:
            known = self._known.get(sha256)
            if known is not None:
                self._known.move_to_end(sha256)
                return known
            leader = self._leaders.get(sha256)
            if leader is None:
                break
            analysis = await asyncio.shield(leader)
            if analysis is not None:
                return analysis
            # the leader's analysis failed: the next one of these bytes goes itself (loop)
        self._leaders[sha256] = asyncio.get_running_loop().create_future()
        stored = await self._stored(sha256)
        if stored is not None:
            self.settle(sha256, stored)
        return stored

    def settle(self, sha256: str, analysis: ReusableAnalysis | None) -> None:
        """The leader's answer: followers reuse it, or (None) one of them goes to the GPU."""
        if analysis is not None:
            self._known[sha256] = analysis
            self._known.move_to_end(sha256)
            while len(self._known) > self.remembered:
                self._known.popitem(last=False)
        leader = self._leaders.pop(sha256, None)
        if leader is not None and not leader.done():
            leader.set_result(analysis)

    async def _stored(self, sha256: str) -> ReusableAnalysis | None:
        future = asyncio.get_running_loop().create_future()
        self._queued.append((sha256, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # lets the images fetched at the same moment join the batch
        while self._queued:
            batch, self._queued = self._queued[: self.max_batch], self._queued[self.max_batch :]
            try:
                found = await self._lookup(sorted({sha for sha, _ in batch}))
                self.lookups += 1
            except Exception as exc:  # a failed lookup costs GPU time, never a result
                log.warning("looking up analysed duplicates failed (%s); sending the images", exc.__class__.__name__)
                found = {}
            for sha, future in batch:
                if not future.done():
                    future.set_result(found.get(sha))


def reused_outcome(claimed: ClaimedUrl, result: FetchResult, analysis: ReusableAnalysis) -> UrlOutcome:
    """The URL is done with the analysis of identical bytes: its own download columns, the source's
    analysis, no GPU time."""
    columns = fetch_columns(result) | {name: analysis.columns.get(name) for name in REUSED_COLUMNS} | {
        "reused_from": analysis.source_url_hash,
        "gpu": None,
        "inference_ms": None,
    }
    return UrlOutcome(claimed.url_hash, claimed.url, claimed.shard_id, "done", claimed.attempts + 1, result=columns)


def analysis_of(outcome: UrlOutcome) -> ReusableAnalysis | None:
    """What a leader's outcome lends to the URLs with the same bytes (None unless it is done)."""
    if outcome.state != "done":
        return None
    source = outcome.result.get("reused_from") or outcome.url_hash
    return ReusableAnalysis(source, {name: outcome.result.get(name) for name in REUSED_COLUMNS})
