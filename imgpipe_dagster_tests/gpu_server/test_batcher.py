"""The dynamic batcher, against a scripted engine (the HTTP tests use the real engine)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from imgpipe_dagster.gpu_server.batcher import BatcherClosed, DynamicBatcher, QueueFull
from imgpipe_dagster.gpu_server.settings import ServerSettings
from imgpipe_dagster.settings_map import medium_server_settings


@dataclass
class FakeResult:
    text: str
    error: str | None = None


class ScriptedEngine:
    """prepare() records its batches; generate() can be held until released; b"bad" fails prepare."""

    def __init__(self, hold_generate: bool = False) -> None:
        self.release = threading.Event()
        if not hold_generate:
            self.release.set()
        self.generate_started = threading.Event()
        self.prepared_batches: list[tuple[str, list[bytes]]] = []
        self.generated_batches: list[tuple[str, list[bytes]]] = []
        self.generating_now = 0
        self.most_generating_at_once = 0
        self.fail_generate_for: set[bytes] = set()
        self._lock = threading.Lock()

    def prepare(self, images: list[bytes], prompt_name: str) -> tuple[str, list[bytes]]:
        if b"bad" in images:
            raise ValueError("cannot identify image file")
        with self._lock:
            self.prepared_batches.append((prompt_name, list(images)))
        return prompt_name, list(images)

    def generate(self, batch: tuple[str, list[bytes]]) -> list[FakeResult]:
        with self._lock:
            self.generating_now += 1
            self.most_generating_at_once = max(self.most_generating_at_once, self.generating_now)
        self.generate_started.set()
        try:
            self.release.wait(timeout=120)  # generous: a loaded CI machine must not release it early
            prompt, images = batch
            if self.fail_generate_for & set(images):
                raise RuntimeError("CUDA error: device-side assert triggered")
            with self._lock:
                self.generated_batches.append(batch)
            return [FakeResult(f"{prompt}:{image.decode()}") for image in images]
        finally:
            with self._lock:
                self.generating_now -= 1


def settings(**overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "max_inference_batch_size": 4,
        "batch_wait_timeout": 0.01,
        "max_concurrent_generations": 3,
        "max_inference_queue_size": 100,
        "gen_time_default_est": 2.0,
    }
    values.update(overrides)
    return medium_server_settings("unused", **values)


def images(*names: str) -> list[bytes]:
    return [name.encode() for name in names]


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def run(coroutine):
    return asyncio.run(coroutine)


def test_images_waiting_behind_a_busy_gpu_gather_into_full_batches() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine(hold_generate=True)
        batcher = DynamicBatcher(engine, settings())
        batcher.start()
        first = asyncio.create_task(batcher.submit(images("a0"), "p"))
        await wait_until(engine.generate_started.is_set)
        later = [asyncio.create_task(batcher.submit(images(f"b{i}"), "p")) for i in range(8)]
        await wait_until(lambda: len(engine.prepared_batches) == 3)
        engine.release.set()
        outcomes = [await first] + [await task for task in later]
        await batcher.close()
        assert [len(batch_images) for _, batch_images in engine.generated_batches] == [1, 4, 4]
        assert [outcome[0].result.text for outcome in outcomes] == ["p:a0"] + [f"p:b{i}" for i in range(8)]
        assert batcher.stats.batches == 3 and batcher.stats.batched_images == 9

    run(scenario())


def test_next_batch_is_prepared_while_the_current_one_generates_but_generate_never_overlaps() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine(hold_generate=True)
        batcher = DynamicBatcher(engine, settings(max_concurrent_generations=4))
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(images(f"i{i}"), "p")) for i in range(4)]
        await wait_until(engine.generate_started.is_set)
        tasks += [asyncio.create_task(batcher.submit(images(f"j{i}"), "p")) for i in range(8)]
        # Both follow-up batches get prepared although the first generate() is still held.
        await wait_until(lambda: len(engine.prepared_batches) == 3)
        assert engine.generating_now == 1 and len(engine.generated_batches) == 0
        engine.release.set()
        await asyncio.gather(*tasks)
        await batcher.close()
        assert engine.most_generating_at_once == 1
        assert len(engine.generated_batches) == 3

    run(scenario())


def test_full_queue_refuses_the_whole_request_with_a_retry_estimate() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine(hold_generate=True)
        batcher = DynamicBatcher(
            engine,
            settings(max_concurrent_generations=1, max_inference_queue_size=4, gen_time_default_est=2.0),
        )
        batcher.start()
        in_gpu = asyncio.create_task(batcher.submit(images("g"), "p"))
        await wait_until(engine.generate_started.is_set)
        waiting = asyncio.create_task(batcher.submit(images("q0", "q1", "q2"), "p"))
        await wait_until(lambda: batcher.queued == 3)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(images("r0", "r1"), "p")
        # One image over capacity: one batch to drain plus the batch in the GPU, 2 s each by default.
        assert refused.value.retry_after_s == 4.0
        assert batcher.queued == 3  # nothing of the refused request was admitted
        fits = asyncio.create_task(batcher.submit(images("s"), "p"))
        engine.release.set()
        await asyncio.gather(in_gpu, waiting, fits)
        await batcher.close()

    run(scenario())


def test_an_image_that_cannot_be_prepared_fails_alone() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine()
        batcher = DynamicBatcher(engine, settings(batch_wait_timeout=0.2))
        batcher.start()
        outcomes = await batcher.submit(images("ok0", "bad", "ok1"), "p")
        await batcher.close()
        assert [outcome.failed for outcome in outcomes] == [False, True, False]
        assert "cannot identify image file" in outcomes[1].error
        assert outcomes[0].result.text == "p:ok0" and outcomes[2].result.text == "p:ok1"
        assert outcomes[0].batch_size == 2 and outcomes[1].batch_size == 0
        assert batcher.stats.processed == 2 and batcher.stats.failed == 1

    run(scenario())


def test_a_batch_whose_generate_raises_fails_and_the_batcher_keeps_serving() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine()
        engine.fail_generate_for = {b"poison"}
        batcher = DynamicBatcher(engine, settings())
        batcher.start()
        failed = await batcher.submit(images("poison", "x"), "p")
        assert all(outcome.failed for outcome in failed)
        assert "device-side assert" in failed[0].error
        served = await batcher.submit(images("y"), "p")
        await batcher.close()
        assert served[0].result.text == "p:y" and not served[0].failed

    run(scenario())


def test_batches_never_mix_prompts() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine(hold_generate=True)
        batcher = DynamicBatcher(engine, settings(max_concurrent_generations=1))
        batcher.start()
        blocker = asyncio.create_task(batcher.submit(images("z"), "p"))
        await wait_until(engine.generate_started.is_set)
        mixed = [
            asyncio.create_task(batcher.submit(images(f"m{i}"), "caption" if i % 2 else "analysis"))
            for i in range(6)
        ]
        await wait_until(lambda: batcher.queued == 6)
        engine.release.set()
        results = await asyncio.gather(blocker, *mixed)
        await batcher.close()
        assert engine.generated_batches[1:] == [
            ("analysis", images("m0", "m2", "m4")),
            ("caption", images("m1", "m3", "m5")),
        ]
        assert [r[0].result.text for r in results[1:]] == [
            f"{'caption' if i % 2 else 'analysis'}:m{i}" for i in range(6)
        ]

    run(scenario())


def test_timings_and_throughput_are_reported() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine()
        seen: list[int] = []
        batcher = DynamicBatcher(
            engine, settings(), on_batch_done=lambda size, gen_s, prep_s: seen.append(size)
        )
        batcher.start()
        outcomes = await batcher.submit(images("a", "b", "c", "d"), "p")
        await batcher.close()
        assert seen == [4]
        for outcome in outcomes:
            assert outcome.batch_size == 4
            assert outcome.queue_ms >= 0 and outcome.batch_ms >= 0 and outcome.prepare_ms >= 0
            assert outcome.inference_ms >= 0
        assert batcher.images_per_second() > 0
        assert batcher.batch_seconds_estimate < 2.0  # moved from the default towards the measured time

    run(scenario())


def test_close_finishes_admitted_work_then_refuses_new_work() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine()
        batcher = DynamicBatcher(engine, settings(batch_wait_timeout=5.0))
        batcher.start()
        admitted = asyncio.create_task(batcher.submit(images("a", "b"), "p"))
        await wait_until(lambda: batcher.queued == 2)
        # Closing does not wait out batch_wait_timeout: the partial batch goes at once.
        await batcher.close(timeout_s=30)
        assert [outcome.result.text for outcome in await admitted] == ["p:a", "p:b"]
        with pytest.raises(BatcherClosed):
            await batcher.submit(images("c"), "p")

    run(scenario())


def test_close_that_gives_up_answers_every_waiting_image() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine(hold_generate=True)
        batcher = DynamicBatcher(engine, settings(max_concurrent_generations=1))
        batcher.start()
        stuck = asyncio.create_task(batcher.submit(images("s"), "p"))
        await wait_until(engine.generate_started.is_set)
        waiting = asyncio.create_task(batcher.submit(images("w"), "p"))
        await wait_until(lambda: batcher.queued == 1)
        await batcher.close(timeout_s=0.1)
        engine.release.set()
        for task in (stuck, waiting):
            with pytest.raises(BatcherClosed):
                await task

    run(scenario())


def test_a_batch_merges_at_most_max_inference_batch_size_requests_and_max_batch_images_images() -> None:
    async def scenario() -> None:
        engine = ScriptedEngine(hold_generate=True)
        batcher = DynamicBatcher(
            engine, settings(max_inference_batch_size=2, max_batch_images=5, max_concurrent_generations=1)
        )
        batcher.start()
        first = asyncio.create_task(batcher.submit(images("a0"), "p"))
        await wait_until(engine.generate_started.is_set)  # the GPU is busy: the next requests queue up
        rest = [
            asyncio.create_task(batcher.submit(images("b0", "b1"), "p")),
            asyncio.create_task(batcher.submit(images("c0", "c1"), "p")),
            asyncio.create_task(batcher.submit(images("d0", "d1", "d2", "d3", "d4", "d5"), "p")),
        ]
        await asyncio.sleep(0.05)
        engine.release.set()
        await asyncio.gather(first, *rest)
        await batcher.close()
        sizes = [images_ for _, images_ in engine.generated_batches]
        # two requests per batch (b+c), then one request cut at the image cap (d0..d4), then its rest
        assert sizes == [[b"a0"], [b"b0", b"b1", b"c0", b"c1"], [b"d0", b"d1", b"d2", b"d3", b"d4"], [b"d5"]]

    run(scenario())
