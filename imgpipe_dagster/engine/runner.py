"""One shard run: claim → fetch → GPU → write, as a pipeline of bounded asyncio stages.

Every URL the run leases leaves it through exactly one outcome (engine/outcomes.py decides which,
engine/writer.py stores it): done or failed_permanent (final, with a result row), failed_retryable
(backoff, claimed again when due, before fresh URLs) or pending (a GPU outage or a deferred host:
returned without spending the URL's retry budget). The run ends when every URL of its shards is
final, or when what is left is not due yet (a later run finishes it) or leased by another live run,
or when its tail is a few slow hosts' URLs that it hands back to the pool (engine/tail.py).
The downloads in flight follow the work (engine/inflight.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg_pool import ConnectionPool

from imgpipe_dagster.engine import outcomes
from imgpipe_dagster.engine.dedupe import DuplicateImages, analysis_of, reused_outcome
from imgpipe_dagster.engine.image_store import ImageStore
from imgpipe_dagster.engine.inflight import InFlightBounds, InFlightController, MachineBudget, Sample
from imgpipe_dagster.engine.settings import EngineSettings
from imgpipe_dagster.engine.stats import RunStats, RunSummary
from imgpipe_dagster.engine.tail import TailWatch
from imgpipe_dagster.engine.writer import OutcomeWriter
from imgpipe_dagster.fetch import FetchResult, ImageFetcher
from imgpipe_dagster.fetch.fetcher import origin_of
from imgpipe_dagster.gpu_server.client import (
    GpuClient,
    RequestRejected,
    ServerBusy,
    ServerTimeout,
    ServerUnavailable,
)
from imgpipe_dagster.host_memory import release_free_memory
from imgpipe_dagster.paths import imgpipe_home
from imgpipe_dagster.resilience.limiter import QueueFull, QueueTimeout
from imgpipe_dagster.resilience.retry import RetryPolicy
from imgpipe_dagster.resilience.router import Router
from imgpipe_dagster.resilience.settings import RetrySettings
from imgpipe_dagster.store import liveness, versions, work
from imgpipe_dagster.store.work import ClaimedUrl, Leftover, UrlOutcome

log = logging.getLogger("imgpipe.engine")

_END = object()  # end-of-stream marker between stages
_RETRY, _FRESH, _LAST = 0, 1, 2  # order of the fetcher's input


@dataclass
class _Fetched:
    claimed: ClaimedUrl
    result: FetchResult


class DownloadFigures:
    """What the download stage did: downloads in flight over time, slot seconds by outcome kind
    ("ok" or the error class), and the tail after the first pass."""

    def __init__(self) -> None:
        self.in_flight_samples = 0
        self.in_flight_sum = 0
        self.in_flight_peak = 0
        self.limit_peak = 0
        self.completed = 0  # downloads finished
        self.completed_ok = 0  # downloads that brought an image
        self.images_to_gpu = 0
        self.body_bytes = 0
        self.last_fresh_outcome_at: float | None = None
        self.images_at_last_fresh = 0
        self.tail_handed_back = 0  # URLs the run handed back to the pool as its tail (engine/tail.py)
        self.tail_hand_back_reason: str | None = None

    def sample(self, in_flight: int | None, limit: int) -> None:
        self.limit_peak = max(self.limit_peak, limit)
        if in_flight is not None:
            self.in_flight_samples += 1
            self.in_flight_sum += in_flight
            self.in_flight_peak = max(self.in_flight_peak, in_flight)

    def summary(self, ended_at: float, slot_seconds: Counter, controller: InFlightController) -> dict:
        tail_s = ended_at - self.last_fresh_outcome_at if self.last_fresh_outcome_at is not None else 0.0
        return {
            "in_flight_mean": round(self.in_flight_sum / self.in_flight_samples, 1) if self.in_flight_samples else None,
            "in_flight_peak": self.in_flight_peak,
            "in_flight_limit_peak": self.limit_peak,
            "in_flight_limit_last": controller.limit,
            "in_flight_reason": controller.reason,
            "slot_seconds_per_url": round(sum(slot_seconds.values()) / self.completed, 3) if self.completed else None,
            "slot_seconds": {kind: round(s, 2) for kind, s in slot_seconds.most_common()},
            "tail_after_first_pass_s": round(max(tail_s, 0.0), 2),
            "images_to_gpu_in_tail": self.images_to_gpu - self.images_at_last_fresh,
            "images_to_gpu": self.images_to_gpu,
            "tail_handed_back": self.tail_handed_back,
            "tail_hand_back_reason": self.tail_hand_back_reason,
        }


class ShardRunner:
    def __init__(
        self,
        database_url: str,
        owner: str,
        shard_ids: Sequence[str],
        settings: EngineSettings,
        endpoints: Sequence[str],
        *,
        gpu_token: str | None = None,
        gpu_names: Sequence[str] | None = None,
        progress: Callable[[str, RunSummary], None] | None = None,
        analysis_version: str = versions.UNVERSIONED,
        image_store: str | None = None,
        reuse_duplicates: bool = True,
        client_factory: Callable[[str, float, int], GpuClient] | None = None,
    ) -> None:
        """``client_factory(base URL, request timeout s, connections)`` makes the GPU tier's client
        (the native GpuClient by default; gpu_server/openai_client.py for an OpenAI-compatible tier)."""
        if not shard_ids:
            raise ValueError("a shard run needs at least one shard")
        run, fetch = settings.run, settings.fetch
        self.database_url = database_url
        self.owner = owner
        self.shard_ids = list(shard_ids)
        self.settings = settings
        self.endpoints = list(endpoints)
        self.gpu_token = gpu_token
        self.gpu_names = list(gpu_names) if gpu_names else [f"gpu{i}" for i in range(len(self.endpoints))]
        self.progress = progress or (lambda line, summary: log.info(line))
        # results are stored under this version; the shards are bound to it before any claim
        self.analysis_version = analysis_version
        # base path of the image store (engine/image_store.py): stored images are read instead of
        # downloaded, downloaded ones are added; None: off
        self.image_store = ImageStore(image_store, owner, settings.fetch.output_format) if image_store else None
        # identical bytes analysed once per version (engine/dedupe.py); None: every image is sent
        self.duplicates = DuplicateImages(self._stored_analyses) if reuse_duplicates else None
        self._routing: set[asyncio.Task] = set()  # images waiting for a duplicate lookup
        self._routing_slots = asyncio.Semaphore(256)
        self._leaders: dict[bytes, str] = {}  # url_hash -> sha256 of images sent for their duplicates
        self.rebound: dict[str, str] = {}  # shards this run moved from another analysis version: {shard: previous}
        self.client_factory = client_factory or (
            lambda url, timeout_s, connections: GpuClient(url, token=gpu_token, timeout_s=timeout_s,
                                                          max_connections=connections)
        )  # fmt: skip
        self.stats = RunStats()
        self.downloads = DownloadFigures()
        self.fetch_retry = RetryPolicy(settings.fetch_retry)
        self.inference_retry = RetryPolicy(
            RetrySettings(retry_attempts=run.inference_retry_attempts, retry_delay=run.inference_retry_delay_s)
        )
        self.in_flight = InFlightController(_in_flight_bounds(settings))
        self.tail = TailWatch(window_s=run.tail_window_s, slow_share=run.tail_slow_share,
                              host_share=run.tail_host_share, started_at=time.monotonic())  # fmt: skip
        self.tail_handed_back = asyncio.Event()  # set by the claimer; the fetch stage drops its downloads
        self._past_downloads: set[bytes] = set()  # URLs whose image is in hand (they left the tail)
        self.outstanding = 0  # leased by us and not yet written
        self.unfinished_at_start = 0  # URLs of our shards not final when the run began (for the ETA)
        self.leftover = Leftover()
        self.waiting_for: str | None = None  # whose leases the run waits for, said in the progress lines
        # set while a run is under way (run_async), None outside it
        self.pool: ConnectionPool | None = None
        self.writer: OutcomeWriter | None = None
        self.router: Router | None = None
        self.fetcher: ImageFetcher | None = None
        self.slot_seconds: Counter = Counter()  # seconds download slots were held, by outcome kind
        self.router_snapshot: dict = {}
        self.clients: dict[str, GpuClient] = {}
        # leased URLs for the fetcher: retries ahead of fresh URLs, the end marker after both
        self.urls: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self._queued = 0  # arrival order within a priority
        self.images: asyncio.Queue = asyncio.Queue(maxsize=max(run.images_per_request * run.max_concurrent_batches, 64))
        # leased work ahead of the fetcher at the smallest download limit (it grows with the limit)
        self.min_high_water = max(
            2 * run.images_per_request * run.max_concurrent_batches,
            2 * fetch.prefetch_queue_size + fetch.prefetch_concurrent_downloads,
            2 * run.chunk_size,
        )

    # ------------------------------------------------------------------ entry point

    def run(self) -> RunSummary:
        return asyncio.run(self.run_async())

    async def run_async(self) -> RunSummary:
        run = self.settings.run
        self.pool = ConnectionPool(
            self.database_url, min_size=1, max_size=run.max_concurrent_chunks + 2, open=True,
            kwargs={"connect_timeout": 10}, name=f"imgpipe-{self.owner[:8]}",
            # A connection the server dropped while idle (pg_terminate_backend, a restart) is replaced
            # at checkout instead of failing the next statement.
            check=ConnectionPool.check_connection,
        )  # fmt: skip
        self.writer = OutcomeWriter(self.pool, self.owner, run.chunk_size, run.max_concurrent_chunks, self._written,
                                    analysis_version=self.analysis_version)  # fmt: skip
        self.in_flight.budget = MachineBudget(imgpipe_home() / "downloads-in-flight", self.owner,
                                              run.machine_downloads_in_flight)  # fmt: skip
        try:
            # an unversioned run (engine callers that name no version) only takes shards no version bound
            rebound = {}
            if self.analysis_version != versions.UNVERSIONED:
                rebound = await self._db(versions.bind_shards, self.shard_ids, self.analysis_version, self.owner)
            self.rebound = {shard: previous for shard, previous in rebound.items() if previous is not None}
            for shard_id, previous in self.rebound.items():
                log.info("shard %s: analysis version %s -> %s (its results under %s are kept)", shard_id,
                         previous, self.analysis_version, previous)  # fmt: skip
            counts = await self._db(work.shard_state_counts, self.shard_ids)
            self.stats.total_urls = sum(counts.values())
            self.unfinished_at_start = sum(counts[s] for s in work.UNFINISHED_STATES)
            log.info("shard run %s: %d shards, %d URLs, %d unfinished, GPU servers: %s", self.owner,
                     len(self.shard_ids), self.stats.total_urls, self.unfinished_at_start, ", ".join(self.endpoints))
            await self._pipeline()
            ended_at = time.monotonic()
            counts = await self._db(work.shard_state_counts, self.shard_ids)
            self.leftover = await self._db(work.leftover, self.shard_ids)
        finally:
            # A crash or cancellation returns our leases at once instead of after they expire.
            try:
                released = await asyncio.to_thread(self._release_all)
                if released:
                    log.warning("returned %d leased URLs to pending (run ended early)", released)
            finally:
                if self.image_store is not None:
                    await asyncio.to_thread(self.image_store.close)
                self.in_flight.budget.close()
                self.pool.close()
                release_free_memory()
        summary = self.stats.summary(
            final_state_counts=counts,
            router=self.router_snapshot,
            downloads=self.downloads.summary(ended_at, self.slot_seconds, self.in_flight),
            waiting_for_retry={
                "urls": self.leftover.waiting,
                "next_due_at": self.leftover.next_due_at.isoformat() if self.leftover.next_due_at else None,
                "last_due_at": self.leftover.last_due_at.isoformat() if self.leftover.last_due_at else None,
            },
        )
        self.progress(self.stats.progress_line(0), summary)
        return summary

    def _release_all(self) -> int:
        with self.pool.connection() as conn:
            return work.release_leases(conn, self.owner)

    async def _db(self, func, *args):
        def call():
            with self.pool.connection() as conn:
                return func(conn, *args)

        return await asyncio.to_thread(call)

    # ------------------------------------------------------------------ the pipeline

    async def _pipeline(self) -> None:
        run = self.settings.run
        self.router = Router(self.endpoints, self.settings.limiter, self.settings.breaker, names=self.gpu_names)
        self.clients = {
            url: self.client_factory(url, run.request_timeout, max(run.max_concurrent_batches, 4))
            for url in self.endpoints
        }
        try:
            async with ImageFetcher(self.settings.fetch) as fetcher:
                self.fetcher = fetcher
                self.slot_seconds = fetcher.slot_seconds  # kept for the summary after the fetcher closes
                fetcher.max_in_flight = self.in_flight.limit
                background = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._progress_loop()),
                              asyncio.create_task(self.writer.flush_every(1.0)),
                              asyncio.create_task(self._size_downloads())]  # fmt: skip
                stages = [asyncio.create_task(self._claimer()), asyncio.create_task(self._fetch_stage(fetcher)),
                          asyncio.create_task(self._request_stage())]  # fmt: skip
                try:
                    await asyncio.gather(*stages)
                    await self.writer.flush(wait=True)
                    if self.tail_handed_back.is_set():
                        self.downloads.tail_handed_back = await self._db(
                            work.hand_back_tail, self.owner, self.shard_ids, run.retry_wait_s, run.host_deferral_s)
                        log.info("handed %d URLs back to the pool, due in %.0fs: %s", self.downloads.tail_handed_back,
                                 run.host_deferral_s, self.downloads.tail_hand_back_reason)  # fmt: skip
                finally:
                    for task in stages + background:
                        task.cancel()
                    await asyncio.gather(*stages, *background, return_exceptions=True)
        finally:
            self.fetcher = None
            self.router_snapshot = self.router.snapshot()
            for client in self.clients.values():
                await client.aclose()

    def _high_water(self) -> int:
        """URLs leased ahead: enough to keep every download slot and the GPU requests busy. The fetcher
        takes up to twice its limit ahead; one more limit's worth waits here, where retries go first."""
        return max(self.min_high_water, 3 * self.in_flight.limit)

    async def _claimer(self) -> None:
        run = self.settings.run
        waiting_on_others_since: float | None = None
        try:
            while True:
                high_water = self._high_water()
                room = high_water - self.outstanding
                claimed: list[ClaimedUrl] = []
                if room >= min(high_water // 4, 64) or self.outstanding == 0:
                    try:
                        claimed = await self._db(work.claim, self.owner, self.shard_ids, room, run.lease_seconds,
                                                 self.analysis_version)  # fmt: skip
                    except psycopg.OperationalError as exc:  # connection lost; the claim rolled back (almost always)
                        log.warning("claiming work failed (%s); trying again", exc.__class__.__name__)
                        await asyncio.sleep(1.0)
                        continue
                    if len(claimed) < room:
                        self.tail.fresh_ran_out(time.monotonic())
                for item in claimed:
                    self.outstanding += 1
                    self.tail.claimed(item.url_hash, origin_of(item.url) or "")
                    if item.attempts == 0:
                        self.fetch_retry.note_first_attempt()
                    self._queue_url(item)
                if claimed:
                    waiting_on_others_since = None
                    self.waiting_for = None
                    continue
                reason = self.tail.hand_back_reason(time.monotonic(), run.retry_wait_s)
                if reason is not None:
                    self.downloads.tail_hand_back_reason = reason
                    self.tail_handed_back.set()
                    return
                if self.outstanding > 0:
                    await asyncio.sleep(0.2)
                    continue
                try:
                    left = await self._db(work.leftover, self.shard_ids)
                except psycopg.OperationalError as exc:
                    log.warning("counting unfinished work failed (%s); trying again", exc.__class__.__name__)
                    await asyncio.sleep(1.0)
                    continue
                if left.unfinished == 0:
                    return
                if left.claimable:  # another run took it between our claim and the count
                    await asyncio.sleep(0.2)
                    continue
                if left.leased:
                    # Someone else holds the rest; a dead run's leases expire and become claimable.
                    waiting_on_others_since = waiting_on_others_since or time.monotonic()
                    await self._say_what_we_wait_for()
                    if time.monotonic() - waiting_on_others_since > 2 * run.lease_seconds:
                        log.warning("%d URLs stay leased by other live runs; leaving them to those runs", left.leased)
                        return
                    await asyncio.sleep(min(1.0, run.lease_seconds / 10))
                    continue
                due_in = (left.next_due_at - datetime.now(UTC)).total_seconds() if left.next_due_at else 0.0
                if due_in > run.retry_wait_s:
                    # Idling through a retry tail keeps the GPU tier waiting: a later run finishes them.
                    log.info("%d URLs wait for a retry (due from %s to %s); leaving them to a later run",
                             left.waiting, left.next_due_at, left.last_due_at)  # fmt: skip
                    return
                await asyncio.sleep(max(min(due_in, 1.0), 0.05))
        finally:
            self.urls.put_nowait((_LAST, 0, _END))

    def _queue_url(self, item: ClaimedUrl) -> None:
        self._queued += 1
        self.urls.put_nowait((_RETRY if item.attempts else _FRESH, self._queued, item))

    async def _claimed_urls(self) -> AsyncIterator[tuple[ClaimedUrl, str]]:
        while True:
            _, _, item = await self.urls.get()
            if item is _END:
                return
            stored = self.image_store.load(item.shard_id, item.url_hash.hex(), item.url, item) if self.image_store else None
            if stored is not None:  # kept by an earlier run: no download
                self._image_in_hand(item)
                await self._to_gpu(_Fetched(item, stored))
                continue
            yield item, item.url

    async def _fetch_stage(self, fetcher: ImageFetcher) -> None:
        downloads = asyncio.create_task(self._download_all(fetcher))
        handed_back = asyncio.create_task(self.tail_handed_back.wait())
        try:
            await asyncio.wait({downloads, handed_back}, return_when=asyncio.FIRST_COMPLETED)
            if not downloads.done():
                # the tail goes back to the pool (the run's leases with it): downloads waiting at their
                # hosts or in flight are dropped, the images already downloaded still go to the GPU tier
                downloads.cancel()
                await asyncio.wait({downloads})
            elif not downloads.cancelled():
                downloads.result()  # raises what failed the downloads
            if self._routing:  # images still waiting for a duplicate's analysis (the GPU stage answers it)
                await asyncio.gather(*list(self._routing))
        finally:
            downloads.cancel()
            handed_back.cancel()
            for task in list(self._routing):  # a failed or cancelled run: nobody answers them any more
                task.cancel()
            await self.images.put(_END)

    async def _download_all(self, fetcher: ImageFetcher) -> None:
        async for result in fetcher.stream(self._claimed_urls()):
            claimed: ClaimedUrl = result.key
            self.stats.sample(self.stats.download_ms, result.download_ms)
            seconds = (result.download_ms or 0) / 1000
            self.stats.stage_s["fetch"] += seconds
            self.downloads.completed += 1
            if result.ok:
                self.downloads.completed_ok += 1
                self.downloads.body_bytes += result.bytes or 0
                if self.image_store is not None:
                    self.image_store.add(claimed.shard_id, claimed.url_hash.hex(), result)
                self._image_in_hand(claimed)
                await self._to_gpu(_Fetched(claimed, result))
            else:
                outcome = outcomes.fetch_failure(claimed, result, self.fetch_retry, datetime.now(UTC),
                                                 deferral_s=self.settings.run.host_deferral_s)  # fmt: skip
                self._emit(outcome, claimed)

    def _image_in_hand(self, claimed: ClaimedUrl) -> None:
        self._past_downloads.add(claimed.url_hash)
        self.tail.left(claimed.url_hash, origin_of(claimed.url) or "", through=True, due_at=None)

    async def _to_gpu(self, fetched: _Fetched) -> None:
        """Queue the image for the GPU, unless identical bytes were (or are being) analysed: then the
        URL reuses that analysis once it is known (engine/dedupe.py), without holding up the fetcher."""
        if self.duplicates is None or not fetched.result.sha256:
            await self.images.put(fetched)
            return
        await self._routing_slots.acquire()
        task = asyncio.create_task(self._reuse_or_send(fetched))
        self._routing.add(task)
        task.add_done_callback(self._routing.discard)
        task.add_done_callback(lambda _t: self._routing_slots.release())

    async def _reuse_or_send(self, fetched: _Fetched) -> None:
        analysis = await self.duplicates.reusable(fetched.result.sha256)
        if analysis is None:
            self._leaders[fetched.claimed.url_hash] = fetched.result.sha256
            await self.images.put(fetched)
            return
        self.duplicates.reused += 1
        self._emit(reused_outcome(fetched.claimed, fetched.result, analysis), fetched.claimed)

    async def _stored_analyses(self, sha256s: Sequence[str]) -> dict:
        return await self._db(versions.find_reusable, self.analysis_version, sha256s)

    async def _request_stage(self) -> None:
        run = self.settings.run
        slots = asyncio.Semaphore(run.max_concurrent_batches)
        tasks: set[asyncio.Task] = set()
        group: list[_Fetched] = []
        ended = False
        while not ended:
            timeout = run.request_fill_wait_s if group else None
            try:
                # images already waiting are taken at once: wait_for runs get() as a task of its own,
                # one loop turn per image, which at hundreds of downloads in flight held a GPU
                # request's 32 images for seconds (bench/web.py)
                item = self.images.get_nowait() if self.images.qsize() else await asyncio.wait_for(self.images.get(), timeout)
            except TimeoutError:
                item = None
            if item is _END:
                ended = True
            elif item is not None:
                group.append(item)
                if len(group) < run.images_per_request:
                    continue
            if group:
                await slots.acquire()
                task = asyncio.create_task(self._infer(group))
                task.add_done_callback(lambda _t: slots.release())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                group = []
        if tasks:
            await asyncio.gather(*tasks)

    async def _infer(self, group: list[_Fetched]) -> None:
        run = self.settings.run
        images = [item.result.image_bytes for item in group]
        self.downloads.images_to_gpu += len(group)
        for attempt in range(1, run.max_gpu_tries + 1):
            pause = 0.0
            try:
                async with self.router.route() as lease:
                    started = time.monotonic()
                    try:
                        results = await self.clients[lease.endpoint].analyze(images, run.prompt_name)
                    except ServerBusy as busy:
                        lease.loss("429", time.monotonic() - started)
                        pause = busy.retry_after_s
                    except (ServerTimeout, TimeoutError):
                        lease.loss("timeout", time.monotonic() - started)
                    except ServerUnavailable as down:
                        lease.loss("error", time.monotonic() - started)
                        pause = down.retry_after_s or 0.0
                    except RequestRejected as rejected:
                        lease.cancel()  # our request was wrong, not the server
                        now = datetime.now(UTC)
                        for item in group:
                            outcome = outcomes.inference_failure(item.claimed, item.result,
                                                                 f"request rejected: {rejected}",
                                                                 self.inference_retry, now)  # fmt: skip
                            self._emit(outcome, item.claimed)
                        return
                    else:
                        latency = time.monotonic() - started
                        lease.success(latency)
                        self.stats.stage_s["inference"] += latency
                        self.stats.images_by_gpu[lease.name] += len(group)
                        now = datetime.now(UTC)
                        for item, analysis in zip(group, results, strict=True):
                            self.stats.sample(self.stats.inference_ms, analysis.timings.get("inference_ms"))
                            outcome = outcomes.analysed(item.claimed, item.result, analysis, lease.name,
                                                        self.inference_retry, now)  # fmt: skip
                            self._emit(outcome, item.claimed)
                        return
            except (QueueFull, QueueTimeout) as pressure:
                log.debug("GPU request waits: %s", pressure)
            self.stats.gpu_retries += 1
            await asyncio.sleep(min(max(pause, 0.05 * attempt), 5.0))
        log.warning("GPU servers failed a request %d times; %d URLs go back to pending", run.max_gpu_tries, len(group))
        for item in group:
            self._emit(outcomes.gpu_unavailable(item.claimed, run.max_gpu_tries), item.claimed)

    # ------------------------------------------------------------------ outcomes

    def _emit(self, outcome: UrlOutcome, claimed: ClaimedUrl) -> None:
        leading = self._leaders.pop(claimed.url_hash, None)
        if leading is not None:  # the URLs waiting for these bytes reuse this analysis, or send their own
            self.duplicates.settle(leading, analysis_of(outcome))
        if outcome.error_class and outcome.state != "pending":
            self.stats.failures_by_class[outcome.error_class] += 1
        now = time.monotonic()
        if claimed.attempts == 0 and outcome.state != "pending":
            self.downloads.last_fresh_outcome_at = now
            self.downloads.images_at_last_fresh = self.downloads.images_to_gpu
        if claimed.url_hash not in self._past_downloads:  # one whose image was in hand left the tail then
            due_at = None
            if outcome.next_attempt_at is not None:
                due_at = now + (outcome.next_attempt_at - datetime.now(UTC)).total_seconds()
            self.tail.left(claimed.url_hash, origin_of(claimed.url) or "",
                           through=outcome.state in ("done", "failed_permanent"), due_at=due_at)  # fmt: skip
        self._past_downloads.discard(claimed.url_hash)
        self.writer.emit(outcome)

    def _written(self, chunk: list[UrlOutcome], seconds: float) -> None:
        self.stats.stage_s["write"] += seconds
        for outcome in chunk:
            self.stats.outcomes[outcome.state] += 1
        self.outstanding -= len(chunk)

    # ------------------------------------------------------------------ upkeep

    async def _size_downloads(self) -> None:
        """Every interval: the downloads in flight the work needs (engine/inflight.py), given to the fetcher."""
        interval = self.settings.run.in_flight_interval_s
        while True:
            await asyncio.sleep(interval)
            fetcher = self.fetcher
            if fetcher is None:
                continue
            in_flight = fetcher.in_flight
            sample = Sample(
                at=time.monotonic(), urls_completed=self.downloads.completed,
                slot_seconds=sum(self.slot_seconds.values()), ok_completed=self.downloads.completed_ok,
                ok_slot_seconds=self.slot_seconds["ok"], images_to_gpu=self.downloads.images_to_gpu,
                body_bytes=self.downloads.body_bytes, in_flight=in_flight,
                gpu_queue_fill=self.images.qsize() / max(self.images.maxsize, 1),
                waiting_for_fetcher=self.urls.qsize(),
            )  # fmt: skip
            limit = await asyncio.to_thread(self.in_flight.step, sample)  # the budget reads a few small files
            fetcher.max_in_flight = limit
            self.downloads.sample(in_flight, limit)

    async def _say_what_we_wait_for(self) -> None:
        """Put in the run log whose leases this run waits for and until when (once per change)."""
        holders = await self._db(liveness.lease_holders, self.shard_ids, self.owner)
        if not holders:
            return
        parts = []
        for holder in holders:
            beat = (f"last heartbeat {holder.heartbeat_at.astimezone(UTC):%H:%M:%S} UTC" if holder.heartbeat_at
                    else "no heartbeat")  # fmt: skip
            parts.append(f"{holder.urls} URLs leased by run {holder.owner} ({beat}) until "
                         f"{holder.expires_at.astimezone(UTC):%H:%M:%S} UTC")  # fmt: skip
        note = ("waiting for " + "; ".join(parts) + ": claimable when those leases expire unless renewed "
                "(a dead run's are released sooner by the dead_runs sensor)")  # fmt: skip
        if note != self.waiting_for:
            self.waiting_for = note
            self.progress(note, self.stats.summary(router=self.router.snapshot()))

    async def _heartbeat(self) -> None:
        interval = self.settings.run.lease_seconds / 4
        while True:
            await asyncio.sleep(interval)
            try:
                await self._db(work.renew_leases, self.owner, self.settings.run.lease_seconds)
            except Exception as exc:  # the next beat tries again; leases outlive a few misses
                log.warning("lease renewal failed: %s", exc.__class__.__name__)

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.run.progress_interval_s)
            remaining = max(self.unfinished_at_start - self.stats.finished, 0)
            summary = self.stats.summary(router=self.router.snapshot())
            line = self.stats.progress_line(remaining)
            self.progress(f"{line}; {self.waiting_for}" if self.waiting_for else line, summary)
            release_free_memory()  # keeps a long run's RSS flat (see host_memory.py)


def _in_flight_bounds(settings: EngineSettings) -> InFlightBounds:
    run, fetch = settings.run, settings.fetch
    if not fetch.enable_prefetch:
        return InFlightBounds(floor=1, ceiling=1)
    floor = min(fetch.prefetch_concurrent_downloads, fetch.max_in_flight_ceiling)
    ceiling = max(floor, fetch.max_in_flight_ceiling)
    return InFlightBounds(floor=floor, ceiling=ceiling, byte_cap=fetch.body_bytes_in_flight,
                          gpu_capacity_images_per_s=run.gpu_capacity_images_per_s, headroom=run.gpu_rate_headroom)  # fmt: skip
