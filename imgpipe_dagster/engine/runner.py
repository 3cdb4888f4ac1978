"""One shard run: claim → fetch → GPU → write, as a pipeline of bounded asyncio stages.

Every URL the run leases leaves it through exactly one outcome write (store.work.write_outcomes):
done or failed_permanent (final, with a result row), failed_retryable (backoff, claimed again
when due) or pending (a GPU outage: returned without spending the URL's retry budget). The run ends
when every URL of its shards is final, or when what is left is leased by another live run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg_pool import ConnectionPool

from imgpipe_dagster.engine.settings import EngineSettings
from imgpipe_dagster.engine.stats import RunStats, RunSummary
from imgpipe_dagster.fetch import FetchResult, ImageFetcher
from imgpipe_dagster.gpu_server.client import (
    GpuClient,
    RequestRejected,
    ServerBusy,
    ServerTimeout,
    ServerUnavailable,
)
from imgpipe_dagster.host_memory import release_free_memory
from imgpipe_dagster.resilience.limiter import QueueFull, QueueTimeout
from imgpipe_dagster.resilience.retry import RetryPolicy
from imgpipe_dagster.resilience.router import Router
from imgpipe_dagster.store import work
from imgpipe_dagster.store.work import ClaimedUrl, UrlOutcome

log = logging.getLogger("imgpipe.engine")

_END = object()  # end-of-stream marker between stages


@dataclass
class _Fetched:
    claimed: ClaimedUrl
    result: FetchResult


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
    ) -> None:
        if not shard_ids:
            raise ValueError("a shard run needs at least one shard")
        self.database_url = database_url
        self.owner = owner
        self.shard_ids = list(shard_ids)
        self.settings = settings
        self.endpoints = list(endpoints)
        self.gpu_token = gpu_token
        self.gpu_names = list(gpu_names) if gpu_names else [f"gpu{i}" for i in range(len(self.endpoints))]
        self.progress = progress or (lambda line, summary: log.info(line))
        self.stats = RunStats()
        self.retry = RetryPolicy(settings.fetch_retry)
        self._outstanding = 0  # leased by us and not yet written
        self._unfinished_at_start = 0  # URLs of our shards not final when the run began (for the ETA)

    # ------------------------------------------------------------------ entry point

    def run(self) -> RunSummary:
        return asyncio.run(self.run_async())

    async def run_async(self) -> RunSummary:
        run = self.settings.run
        pool = ConnectionPool(
            self.database_url, min_size=1, max_size=run.max_concurrent_chunks + 2, open=True,
            kwargs={"connect_timeout": 10}, name=f"imgpipe-{self.owner[:8]}",
            # A connection the server dropped while idle (pg_terminate_backend, a restart) is replaced
            # at checkout instead of failing the next statement.
            check=ConnectionPool.check_connection,
        )  # fmt: skip
        self._pool = pool
        try:
            counts = await self._db(work.shard_state_counts, self.shard_ids)
            self.stats.total_urls = sum(counts.values())
            self._unfinished_at_start = sum(counts[s] for s in work.UNFINISHED_STATES)
            log.info("shard run %s: %d shards, %d URLs, %d unfinished, GPU servers: %s", self.owner,
                     len(self.shard_ids), self.stats.total_urls, self._unfinished_at_start, ", ".join(self.endpoints))
            await self._pipeline()
            counts = await self._db(work.shard_state_counts, self.shard_ids)
        finally:
            # A crash or cancellation returns our leases at once instead of after they expire.
            try:
                released = await asyncio.to_thread(self._release_all)
                if released:
                    log.warning("returned %d leased URLs to pending (run ended early)", released)
            finally:
                pool.close()
                release_free_memory()
        summary = self.stats.summary(final_state_counts=counts, router=self._router_snapshot)
        self.progress(self.stats.progress_line(0), summary)
        return summary

    def _release_all(self) -> int:
        with self._pool.connection() as conn:
            return work.release_leases(conn, self.owner)

    async def _db(self, func, *args):
        def call():
            with self._pool.connection() as conn:
                return func(conn, *args)

        return await asyncio.to_thread(call)

    # ------------------------------------------------------------------ the pipeline

    async def _pipeline(self) -> None:
        run = self.settings.run
        fetch_settings = self.settings.fetch
        self._urls: asyncio.Queue = asyncio.Queue()
        self._images: asyncio.Queue = asyncio.Queue(maxsize=max(run.images_per_request * run.max_concurrent_batches, 64))
        self._pending_outcomes: list[UrlOutcome] = []
        self._write_slots = asyncio.Semaphore(run.max_concurrent_chunks)
        self._write_tasks: set[asyncio.Task] = set()
        self._done = asyncio.Event()
        self._router = Router(self.endpoints, self.settings.limiter, self.settings.breaker, names=self.gpu_names)
        self._clients = {
            url: GpuClient(url, token=self.gpu_token, timeout_s=run.request_timeout,
                           max_connections=max(run.max_concurrent_batches, 4))
            for url in self.endpoints
        }  # fmt: skip
        # Enough leased work to keep every stage busy, without leasing a shard's worth at once.
        self._high_water = max(
            2 * run.images_per_request * run.max_concurrent_batches,
            2 * fetch_settings.prefetch_queue_size + fetch_settings.prefetch_concurrent_downloads,
            2 * run.chunk_size,
        )
        try:
            async with ImageFetcher(fetch_settings) as fetcher:
                background = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._progress_loop()),
                              asyncio.create_task(self._flush_loop())]  # fmt: skip
                stages = [asyncio.create_task(self._claimer()), asyncio.create_task(self._fetch_stage(fetcher)),
                          asyncio.create_task(self._request_stage())]  # fmt: skip
                try:
                    await asyncio.gather(*stages)
                    await self._flush(force=True)
                    if self._write_tasks:
                        await asyncio.gather(*self._write_tasks)
                finally:
                    for task in stages + background:
                        task.cancel()
                    await asyncio.gather(*stages, *background, return_exceptions=True)
        finally:
            self._router_snapshot = self._router.snapshot()
            for client in self._clients.values():
                await client.aclose()

    async def _claimer(self) -> None:
        run = self.settings.run
        waiting_on_others_since: float | None = None
        try:
            while True:
                room = self._high_water - self._outstanding
                claimed: list[ClaimedUrl] = []
                if room >= min(self._high_water // 4, 64) or self._outstanding == 0:
                    try:
                        claimed = await self._db(work.claim, self.owner, self.shard_ids, room, run.lease_seconds)
                    except psycopg.OperationalError as exc:  # connection lost; the claim rolled back (almost always)
                        log.warning("claiming work failed (%s); trying again", exc.__class__.__name__)
                        await asyncio.sleep(1.0)
                        continue
                for item in claimed:
                    self._outstanding += 1
                    if item.attempts == 0:
                        self.retry.note_first_attempt()
                    self._urls.put_nowait(item)
                if claimed:
                    waiting_on_others_since = None
                    continue
                if self._outstanding > 0:
                    await asyncio.sleep(0.2)
                    continue
                try:
                    counts = await self._db(work.shard_state_counts, self.shard_ids)
                except psycopg.OperationalError as exc:
                    log.warning("counting unfinished work failed (%s); trying again", exc.__class__.__name__)
                    await asyncio.sleep(1.0)
                    continue
                if sum(counts[s] for s in work.UNFINISHED_STATES) == 0:
                    return
                if counts["leased"] and not counts["pending"] and not counts["failed_retryable"]:
                    # Someone else holds the rest; a dead run's leases expire and become claimable.
                    waiting_on_others_since = waiting_on_others_since or time.monotonic()
                    if time.monotonic() - waiting_on_others_since > 2 * run.lease_seconds:
                        log.warning("%d URLs stay leased by other live runs; leaving them to those runs",
                                    counts["leased"])
                        return
                await asyncio.sleep(min(1.0, run.lease_seconds / 10))
        finally:
            self._urls.put_nowait(_END)

    async def _claimed_urls(self) -> AsyncIterator[tuple[ClaimedUrl, str]]:
        while True:
            item = await self._urls.get()
            if item is _END:
                return
            yield item, item.url

    async def _fetch_stage(self, fetcher: ImageFetcher) -> None:
        try:
            async for result in fetcher.stream(self._claimed_urls()):
                claimed: ClaimedUrl = result.key
                self.stats.sample(self.stats.download_ms, result.download_ms)
                self.stats.stage_s["fetch"] += (result.download_ms or 0) / 1000
                if result.ok:
                    await self._images.put(_Fetched(claimed, result))
                else:
                    self._emit(self._fetch_failure(claimed, result))
        finally:
            await self._images.put(_END)

    def _fetch_failure(self, claimed: ClaimedUrl, result: FetchResult) -> UrlOutcome:
        error = result.error
        attempt = claimed.attempts + 1
        retryable = bool(error and error.error_class.retryable)
        error_class = error.error_class.value if error else "unknown"
        message = error.message if error else "fetch failed"
        self.stats.failures_by_class[error_class] += 1
        outcome = UrlOutcome(claimed.url_hash, claimed.url, claimed.shard_id, "failed_permanent", attempt,
                             error_class, message, result=_fetch_columns(result))  # fmt: skip
        if retryable and attempt <= self.settings.fetch_retry.retry_attempts:
            if self.retry.should_retry(True, attempt):
                delay = self.retry.delay(attempt, error.retry_after if error else None)
            else:  # the retry budget is spent: defer instead of adding load now
                delay = self.settings.fetch_retry.max_backoff_s
            outcome.state = "failed_retryable"
            outcome.next_attempt_at = datetime.now(UTC) + timedelta(seconds=delay)
        return outcome

    async def _request_stage(self) -> None:
        run = self.settings.run
        slots = asyncio.Semaphore(run.max_concurrent_batches)
        tasks: set[asyncio.Task] = set()
        group: list[_Fetched] = []
        ended = False
        while not ended:
            timeout = run.request_fill_wait_s if group else None
            try:
                item = await asyncio.wait_for(self._images.get(), timeout)
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
        for attempt in range(1, run.max_gpu_tries + 1):
            pause = 0.0
            try:
                async with self._router.route() as lease:
                    started = time.monotonic()
                    try:
                        results = await self._clients[lease.endpoint].analyze(images, run.prompt_name)
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
                        for item in group:
                            self._emit(self._inference_failure(item, f"request rejected: {rejected}"))
                        return
                    else:
                        latency = time.monotonic() - started
                        lease.success(latency)
                        self.stats.stage_s["inference"] += latency
                        self.stats.images_by_gpu[lease.name] += len(group)
                        for item, analysis in zip(group, results, strict=True):
                            self._emit(self._analysed(item, analysis, lease.name))
                        return
            except (QueueFull, QueueTimeout) as pressure:
                log.debug("GPU request waits: %s", pressure)
            self.stats.gpu_retries += 1
            await asyncio.sleep(min(max(pause, 0.05 * attempt), 5.0))
        log.warning("GPU servers failed a request %d times; %d URLs go back to pending", run.max_gpu_tries, len(group))
        for item in group:
            c = item.claimed
            self._emit(UrlOutcome(c.url_hash, c.url, c.shard_id, "pending", c.attempts, "gpu_unavailable",
                                  "GPU servers unavailable; returned without spending a retry"))  # fmt: skip

    def _analysed(self, item: _Fetched, analysis, gpu_name: str) -> UrlOutcome:
        if not analysis.ok:
            return self._inference_failure(item, analysis.error or "inference failed")
        c = item.claimed
        inference_ms = analysis.timings.get("inference_ms")
        self.stats.sample(self.stats.inference_ms, inference_ms)
        columns = _fetch_columns(item.result) | {
            "model_text": analysis.text,
            "analysis": analysis.analysis,
            "parse_ok": analysis.parse_ok,
            "model": analysis.model,
            "prompt_version": analysis.prompt_version,
            "prompt_tokens": analysis.prompt_tokens,
            "generated_tokens": analysis.generated_tokens,
            "inference_ms": inference_ms,
            "gpu": gpu_name,
        }
        return UrlOutcome(c.url_hash, c.url, c.shard_id, "done", c.attempts + 1, result=columns)

    def _inference_failure(self, item: _Fetched, message: str) -> UrlOutcome:
        c = item.claimed
        attempt = c.attempts + 1
        self.stats.failures_by_class["inference_error"] += 1
        state = "failed_retryable" if attempt <= self.settings.fetch_retry.retry_attempts else "failed_permanent"
        outcome = UrlOutcome(c.url_hash, c.url, c.shard_id, state, attempt, "inference_error", message,
                             result=_fetch_columns(item.result))  # fmt: skip
        if state == "failed_retryable":
            outcome.next_attempt_at = datetime.now(UTC) + timedelta(seconds=self.retry.delay(attempt))
        return outcome

    # ------------------------------------------------------------------ writing

    def _emit(self, outcome: UrlOutcome) -> None:
        self._pending_outcomes.append(outcome)
        if len(self._pending_outcomes) >= self.settings.run.chunk_size:
            self._start_write(self._take_chunk())

    def _take_chunk(self) -> list[UrlOutcome]:
        size = self.settings.run.chunk_size
        chunk, self._pending_outcomes = self._pending_outcomes[:size], self._pending_outcomes[size:]
        return chunk

    def _start_write(self, chunk: list[UrlOutcome]) -> None:
        task = asyncio.create_task(self._write(chunk))
        self._write_tasks.add(task)
        task.add_done_callback(self._write_tasks.discard)

    async def _flush(self, force: bool = False) -> None:
        while self._pending_outcomes:
            self._start_write(self._take_chunk())
        if force and self._write_tasks:
            await asyncio.gather(*list(self._write_tasks))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._flush()

    async def _write(self, chunk: list[UrlOutcome]) -> None:
        async with self._write_slots:
            started = time.monotonic()
            for attempt in range(1, 11):
                try:
                    await self._db(work.write_outcomes, self.owner, chunk)
                    break
                except Exception as exc:  # the transaction rolled back: writing again is safe
                    if attempt == 10:
                        raise
                    log.warning("writing %d outcomes failed (%s: %s); retrying", len(chunk),
                                exc.__class__.__name__, str(exc).splitlines()[0] if str(exc) else "")
                    await asyncio.sleep(min(0.2 * 2**attempt, 10.0))
            self.stats.stage_s["write"] += time.monotonic() - started
        for outcome in chunk:
            self.stats.outcomes[outcome.state] += 1
        self._outstanding -= len(chunk)

    # ------------------------------------------------------------------ upkeep

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
            remaining = max(self._unfinished_at_start - self.stats.finished, 0)
            summary = self.stats.summary(router=self._router.snapshot())
            self.progress(self.stats.progress_line(remaining), summary)
            release_free_memory()  # keeps a long run's RSS flat (see host_memory.py)


def _fetch_columns(result: FetchResult) -> dict:
    return {
        "http_status": result.http_status,
        "content_type": result.content_type,
        "bytes": result.bytes,
        "width": result.width,
        "height": result.height,
        "format": result.format,
        "sha256": result.sha256,
        "phash": result.phash,
        "download_ms": result.download_ms,
    }
