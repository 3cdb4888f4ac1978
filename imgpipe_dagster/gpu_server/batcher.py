"""Admission queue, dynamic batcher and the prepare → generate pipeline of one GPU server.

Flow of one image: ``submit()`` admits it into a bounded queue (in images) or refuses the whole
request with :class:`QueueFull`; the collector forms batches of one prompt from the oldest images;
a prepare thread turns a batch into model inputs (CPU: decoding, resizing, tokenising); the single
generate thread runs ``engine.generate`` on one batch at a time, because concurrent ``generate()``
calls on one Hugging Face model share state and are unsafe.

Pipelining: while batch N generates, batch N+1 is already formed and prepared, so the GPU never
waits for CPU work. ``max_concurrent_generations`` bounds the batches in the pipeline at once
(preparing, prepared and waiting, or generating). A *full* batch is formed whenever a pipeline
slot is free; a *partial* batch is formed only when its oldest image has waited
``batch_wait_timeout`` and no other batch is ahead of the GPU, so that under load images keep
accumulating into large batches instead of many small ones queueing behind the GPU.
"""

from __future__ import annotations

import asyncio
import math
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from imgpipe_dagster.gpu_server.settings import ServerSettings


class InferenceEngineLike(Protocol):
    """What the batcher needs from ``inference.InferenceEngine``."""

    def prepare(self, images: list[bytes], prompt_name: str) -> Any: ...

    def generate(self, batch: Any) -> Sequence[Any]: ...


class QueueFull(Exception):
    """The admission queue cannot take the request now; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: float, queued: int, capacity: int) -> None:
        super().__init__(
            f"inference queue full ({queued}/{capacity} images); retry after {retry_after_s:.0f}s"
        )
        self.retry_after_s = retry_after_s
        self.queued = queued
        self.capacity = capacity


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass
class ImageOutcome:
    """What happened to one submitted image."""

    # The engine's ImageResult, or None when the image failed before or during generation.
    result: Any | None
    # Why the image failed outside the engine's own result (prepare/generate raised), else None.
    error: str | None
    # Images in the generate() call this image was part of (0 when it never reached one).
    batch_size: int
    # Admission -> taken into a batch.
    queue_ms: float
    # Taken into a batch -> generate() started (CPU preparation plus waiting for the GPU).
    batch_ms: float
    # CPU preparation of the batch (part of batch_ms).
    prepare_ms: float
    # The batch's generate() call.
    inference_ms: float

    @property
    def failed(self) -> bool:
        return self.error is not None or getattr(self.result, "error", None) is not None


@dataclass
class _Item:
    image: bytes
    prompt: str
    future: asyncio.Future[ImageOutcome]
    enqueued_at: float
    # The submit() call the image came with: a batch merges at most max_inference_batch_size of them.
    request: int = 0


@dataclass
class _Batch:
    items: list[_Item]
    prompt: str
    formed_at: float
    prepared: asyncio.Future[_PrepareOutcome] | None = None


@dataclass
class _PrepareOutcome:
    prepared: Any | None
    # Indices into the batch's items that the prepared inputs cover, in order.
    good: list[int]
    # Index -> error text for images that could not be prepared.
    failed: dict[int, str]
    seconds: float


@dataclass
class BatcherStats:
    """Counters read by /health and /metrics (all mutated on the event loop only)."""

    processed: int = 0
    failed: int = 0
    batches: int = 0
    batched_images: int = 0
    generation_seconds_total: float = 0.0
    # Recent (completion time, images) pairs for a throughput window.
    recent: deque[tuple[float, int]] = field(default_factory=deque)


class DynamicBatcher:
    """Bounded admission queue plus a pipelined single-generator batch loop (see module doc)."""

    # Weight of the newest batch in the moving estimate of batch time.
    _EWMA_ALPHA = 0.3
    # Seconds of history behind images_per_second.
    THROUGHPUT_WINDOW_S = 60.0

    def __init__(
        self,
        engine: InferenceEngineLike,
        settings: ServerSettings,
        *,
        on_batch_done: Callable[[int, float, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._on_batch_done = on_batch_done
        self._clock = clock
        self._pending: deque[_Item] = deque()
        self._requests_seen = 0
        self._changed = asyncio.Event()
        self._generate_queue: asyncio.Queue[_Batch | None] = asyncio.Queue()
        self._batches_in_pipeline = 0
        # Batches formed and not finished, so that close() can answer their images if it must give up.
        self._pipeline_batches: dict[int, _Batch] = {}
        # Batches formed but not yet handed to generate() (preparing or prepared and waiting).
        self._batches_ahead = 0
        self._images_in_pipeline = 0
        self._closing = False
        self._prepare_pool = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="prepare")
        # One thread: generate() never runs concurrently on one model.
        self._generate_pool = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._tasks: list[asyncio.Task[None]] = []
        self.batch_seconds_estimate = settings.gen_time_default_est
        self.stats = BatcherStats()
        self.generating = False
        self._started_at = clock()

    # ----- public API -----

    def start(self) -> None:
        self._started_at = self._clock()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._collect_loop(), name="batch-collector"),
            loop.create_task(self._generate_loop(), name="batch-generator"),
        ]

    def reconfigure(self, settings: ServerSettings) -> None:
        """Take over new batching and queue sizes for the batches formed from now on."""
        if settings.prepare_workers != self._settings.prepare_workers:
            # Preparations already submitted finish on the old threads.
            old_pool = self._prepare_pool
            self._prepare_pool = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="prepare")
            old_pool.shutdown(wait=False)
        self._settings = settings
        self._changed.set()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Finish admitted work (up to ``timeout_s``), then stop the loops and threads."""
        self._closing = True
        self._changed.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
        abandoned = list(self._pending) + [
            item for batch in self._pipeline_batches.values() for item in batch.items
        ]
        for item in abandoned:
            if not item.future.done():
                item.future.set_exception(BatcherClosed("server shutting down"))
        self._pending.clear()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._generate_pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: Sequence[bytes], prompt: str) -> list[ImageOutcome]:
        """Queue ``images`` for ``prompt`` and wait for their outcomes, in order.

        Raises :class:`QueueFull` when the request does not fit the queue now (all or nothing).
        """
        if self._closing:
            raise BatcherClosed("server shutting down")
        capacity = self._settings.max_inference_queue_size
        if len(self._pending) + len(images) > capacity:
            raise QueueFull(self.retry_after_seconds(len(images)), len(self._pending), capacity)
        loop = asyncio.get_running_loop()
        now = self._clock()
        self._requests_seen += 1
        items = [_Item(image, prompt, loop.create_future(), now, self._requests_seen) for image in images]
        self._pending.extend(items)
        self._changed.set()
        return list(await asyncio.gather(*(item.future for item in items)))

    def retry_after_seconds(self, request_images: int) -> float:
        """Seconds until ``request_images`` more images would fit the queue, from the measured pace.

        The excess over capacity drains at one batch of ``max_batch_images`` per measured batch
        time; the batches already in the pipeline go first.
        """
        settings = self._settings
        excess = len(self._pending) + request_images - settings.max_inference_queue_size
        batches = math.ceil(max(excess, 1) / settings.max_batch_images) + self._batches_in_pipeline
        return max(1.0, math.ceil(batches * self.batch_seconds_estimate))

    @property
    def queued(self) -> int:
        """Images admitted and waiting to be taken into a batch."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Images taken into a batch (preparing, waiting for the GPU or generating)."""
        return self._images_in_pipeline

    @property
    def batches_in_pipeline(self) -> int:
        return self._batches_in_pipeline

    def images_per_second(self) -> float:
        """Completed images per second over the recent window (0 before anything completed)."""
        now = self._clock()
        self._trim_recent(now)
        recent = self.stats.recent
        if not recent:
            return 0.0
        # Over the whole window (or the time since start when shorter), idle time included.
        span = max(now - max(now - self.THROUGHPUT_WINDOW_S, self._started_at), 1.0)
        return sum(count for _, count in recent) / span

    # ----- collector: forms batches -----

    async def _collect_loop(self) -> None:
        settings = self._settings
        while True:
            if self._closing and not self._pending:
                await self._generate_queue.put(None)
                return
            _, full = self._select_head()
            slot_free = self._batches_in_pipeline < settings.max_concurrent_generations
            now = self._clock()
            deadline = self._pending[0].enqueued_at + settings.batch_wait_timeout if self._pending else None
            overdue = deadline is not None and (now >= deadline or self._closing)
            if slot_free and (full or (overdue and self._batches_ahead == 0)):
                self._form_batch()
                continue
            self._changed.clear()
            timeout = None
            if slot_free and deadline is not None and now < deadline:
                timeout = deadline - now
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    def _select_head(self) -> tuple[list[int], bool]:
        """Indices of the pending images the next batch takes (the head's prompt, at most
        max_batch_images images from at most max_inference_batch_size requests), and whether that
        batch is full (one of the two caps is reached)."""
        if not self._pending:
            return [], False
        settings = self._settings
        prompt = self._pending[0].prompt
        taken: list[int] = []
        requests: set[int] = set()
        for index, item in enumerate(self._pending):
            if item.prompt != prompt:
                continue
            if item.request not in requests:
                if len(requests) >= settings.max_inference_batch_size:
                    return taken, True
                requests.add(item.request)
            taken.append(index)
            if len(taken) >= settings.max_batch_images:
                return taken, True
        # a request's images arrive together, so reaching the request cap here means the batch is full
        return taken, len(requests) >= settings.max_inference_batch_size

    def _form_batch(self) -> None:
        prompt = self._pending[0].prompt
        chosen = set(self._select_head()[0])
        taken = [item for index, item in enumerate(self._pending) if index in chosen]
        kept = deque(item for index, item in enumerate(self._pending) if index not in chosen)
        self._pending = kept
        batch = _Batch(taken, prompt, self._clock())
        loop = asyncio.get_running_loop()
        batch.prepared = asyncio.wrap_future(
            self._prepare_pool.submit(self._prepare, [item.image for item in taken], prompt), loop=loop
        )
        self._pipeline_batches[id(batch)] = batch
        self._batches_in_pipeline += 1
        self._batches_ahead += 1
        self._images_in_pipeline += len(taken)
        self._generate_queue.put_nowait(batch)

    def _prepare(self, images: list[bytes], prompt: str) -> _PrepareOutcome:
        """Prepare a batch; if that fails, find the images at fault so only they fail (thread)."""
        started = time.perf_counter()
        try:
            prepared = self._engine.prepare(images, prompt)
            return _PrepareOutcome(prepared, list(range(len(images))), {}, time.perf_counter() - started)
        except Exception as batch_error:
            if len(images) == 1:
                return _PrepareOutcome(None, [], {0: _describe(batch_error)}, time.perf_counter() - started)
        good: list[int] = []
        failed: dict[int, str] = {}
        for index, image in enumerate(images):
            try:
                self._engine.prepare([image], prompt)
                good.append(index)
            except Exception as image_error:
                failed[index] = _describe(image_error)
        prepared = None
        if good:
            try:
                prepared = self._engine.prepare([images[index] for index in good], prompt)
            except Exception as retry_error:
                failed.update({index: _describe(retry_error) for index in good})
                good = []
        return _PrepareOutcome(prepared, good, failed, time.perf_counter() - started)

    # ----- generator: one batch at a time -----

    async def _generate_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._generate_queue.get()
            if batch is None:
                return
            try:
                await self._run_batch(loop, batch)
            except Exception:  # the loop must survive anything one batch does
                traceback.print_exc()
                self._fail_unresolved(batch, "internal error in the batch loop")
            finally:
                self._pipeline_batches.pop(id(batch), None)
                self._batches_in_pipeline -= 1
                self._images_in_pipeline -= len(batch.items)
                self._changed.set()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        assert batch.prepared is not None
        try:
            prepare = await batch.prepared
        except Exception as error:
            prepare = _PrepareOutcome(None, [], {i: _describe(error) for i in range(len(batch.items))}, 0.0)
        self._batches_ahead -= 1
        self._changed.set()
        generate_started = self._clock()
        results: Sequence[Any] = []
        generate_error: str | None = None
        generate_seconds = 0.0
        if prepare.prepared is not None and prepare.good:
            self.generating = True
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._generate_pool, self._engine.generate, prepare.prepared
                )
                if len(results) != len(prepare.good):
                    generate_error = f"engine returned {len(results)} results for {len(prepare.good)} images"
            except Exception as error:
                generate_error = "generation failed: " + _describe(error)
            finally:
                generate_seconds = time.perf_counter() - started
                self.generating = False
        # Rows that really ran: the engine may carry undecodable images as per-image errors.
        rows = getattr(prepare.prepared, "rows", len(prepare.good)) if prepare.good else 0
        generated = rows if generate_error is None else 0
        by_index = dict(zip(prepare.good, results, strict=False)) if generate_error is None else {}
        good = set(prepare.good)
        for index, item in enumerate(batch.items):
            if item.future.done():
                continue
            error = prepare.failed.get(index)
            if error is None and index not in by_index:
                error = generate_error or "no result"
            outcome = ImageOutcome(
                result=by_index.get(index),
                error=error,
                batch_size=rows if index in good else 0,
                queue_ms=(batch.formed_at - item.enqueued_at) * 1000.0,
                batch_ms=(generate_started - batch.formed_at) * 1000.0,
                prepare_ms=prepare.seconds * 1000.0,
                inference_ms=generate_seconds * 1000.0,
            )
            if outcome.failed:
                self.stats.failed += 1
            else:
                self.stats.processed += 1
            item.future.set_result(outcome)
        if rows:
            self._record_batch(rows, generated, generate_seconds, prepare.seconds)

    def _record_batch(
        self, size: int, generated: int, generate_seconds: float, prepare_seconds: float
    ) -> None:
        stats = self.stats
        stats.batches += 1
        stats.batched_images += size
        stats.generation_seconds_total += generate_seconds
        if generated:
            # Under the load that fills the queue batches are full, so the plain batch time is the
            # pace that matters for Retry-After.
            self.batch_seconds_estimate += self._EWMA_ALPHA * (generate_seconds - self.batch_seconds_estimate)
            now = self._clock()
            stats.recent.append((now, generated))
            self._trim_recent(now)
        if self._on_batch_done is not None:
            self._on_batch_done(size, generate_seconds, prepare_seconds)

    def _trim_recent(self, now: float) -> None:
        recent = self.stats.recent
        while recent and now - recent[0][0] > self.THROUGHPUT_WINDOW_S:
            recent.popleft()

    def _fail_unresolved(self, batch: _Batch, reason: str) -> None:
        for item in batch.items:
            if not item.future.done():
                self.stats.failed += 1
                item.future.set_result(ImageOutcome(None, reason, 0, 0.0, 0.0, 0.0, 0.0))


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:500] if text else type(error).__name__
