"""Duplicates analysed once: GPU requests saved and images/s on a corpus with exact duplicates, against
the same corpus without reuse, in the same run.

The corpus: ``--urls`` URLs on the test image server (the bundled photographs at many widths, so each
width is other bytes), of which ``--duplicate-share`` repeat an image already in the corpus, in random
order. The GPU tier is a stand-in that costs ``--gpu-ms-per-image`` per image, one image at a time (a
GPU), and counts what it was sent. Both passes run the same engine (ShardRunner) on their own shard,
under their own analysis version (so the second finds nothing of the first to reuse); the image
server's renders are warmed first, so both passes download the same cached bytes.

    python bench/duplicates.py [--urls 600] [--duplicate-share 0.3] [--gpu-ms-per-image 40]

Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from bench_db import fresh_database  # noqa: E402
from web_hosts import keep_alive, response  # noqa: E402

from imgpipe_dagster.engine.runner import ShardRunner  # noqa: E402
from imgpipe_dagster.gpu_server import wire  # noqa: E402
from imgpipe_dagster.profiles import resolve  # noqa: E402
from imgpipe_dagster.settings_map import engine_settings, medium_fetch_settings  # noqa: E402
from imgpipe_dagster.store import database as db  # noqa: E402
from imgpipe_dagster_tests.support import seed_corpus  # noqa: E402
from imgpipe_dagster_tests.web.image_server import ImageServer, photo_names  # noqa: E402


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


class GpuStandIn:
    """The GPU server's /v1/analyze contract on 127.0.0.1: a fixed cost per image, one image at a time."""

    def __init__(self, seconds_per_image: float) -> None:
        self.seconds_per_image = seconds_per_image
        self.images = 0
        self.requests = 0
        self.url = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def answer(method: str, path: str, body: bytes) -> bool:
            if path != "/v1/analyze" or method != "POST":
                writer.write(response(404, b"no route"))
                await writer.drain()
                return True
            images = wire.decode_request(body).images
            async with self._gpu:
                await asyncio.sleep(self.seconds_per_image * len(images))
                self.images += len(images)
                self.requests += 1
            payload = {"model": "gpu-stand-in", "prompt_version": "stand-in", "request_ms": 0.0, "results": [
                {"index": i, "text": "{}", "analysis": {}, "parse_ok": True, "prompt_tokens": 1,
                 "generated_tokens": 1, "error": None, "batch_size": len(images), "timings": {"inference_ms": 0.0}}
                for i in range(len(images))]}  # fmt: skip
            writer.write(response(200, json.dumps(payload).encode(), "application/json"))
            await writer.drain()
            return True

        await keep_alive(reader, writer, answer)

    async def _start(self) -> None:
        self._gpu = asyncio.Lock()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()

    def __enter__(self) -> GpuStandIn:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        if not self._ready.wait(30):
            raise RuntimeError("the GPU stand-in did not start within 30 s")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def corpus_images(server: ImageServer, urls: int, duplicate_share: float, seed: int) -> list[tuple[str, int]]:
    """(photo, width) per URL: distinct images, then repeats of them, shuffled."""
    names = photo_names()
    unique = urls - round(urls * duplicate_share)
    images = [(names[i % len(names)], 200 + i // len(names) * 4) for i in range(unique)]
    rng = random.Random(seed)
    corpus = images + [rng.choice(images) for _ in range(urls - unique)]
    rng.shuffle(corpus)
    return corpus


def run_pass(database_url: str, shard: str, urls: list[str], gpu: GpuStandIn, reuse: bool) -> dict:
    worker, _ = resolve("medium", {"images_per_request": 8, "chunk_size": 100})
    # one loopback host serves every URL: its politeness rate would be what is measured otherwise
    fetch = medium_fetch_settings(allowed_networks=["127.0.0.0/8"], prefetch_concurrent_downloads=16,
                          per_host_requests_per_s=1e6)  # fmt: skip
    images_before, requests_before = gpu.images, gpu.requests
    runner = ShardRunner(database_url, f"bench-{uuid.uuid4().hex[:6]}", [shard], engine_settings(worker, fetch),
                         [gpu.url], progress=lambda line, summary: None, reuse_duplicates=reuse,
                         analysis_version=f"bench:{'reuse' if reuse else 'no-reuse'}")  # fmt: skip
    started = time.perf_counter()
    summary = runner.run()
    elapsed = time.perf_counter() - started
    return {"done": summary.final_count("done"), "seconds": round(elapsed, 2),
            "images_per_s": round(summary.final_count("done") / elapsed, 2),
            "gpu_images": gpu.images - images_before, "gpu_requests": gpu.requests - requests_before,
            "reused": runner.duplicates.reused if runner.duplicates else 0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=600)
    parser.add_argument("--duplicate-share", type=float, default=0.3)
    parser.add_argument("--gpu-ms-per-image", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()
    with (
        fresh_database() as database_url,
        ImageServer() as images,
        GpuStandIn(args.gpu_ms_per_image / 1000) as gpu,
    ):
        corpus = corpus_images(images, args.urls, args.duplicate_share, args.seed)
        with httpx.Client(timeout=60) as client:  # warm the server's renders: both passes get cached bytes
            for name, width in set(corpus):
                client.get(images.image_url(name, "jpg", width=width)).raise_for_status()
        passes = {"without_reuse": False, "with_reuse": True}
        shard_urls = {shard: [images.image_url(name, "jpg", width=width, n=f"{shard}-{i}")
                              for i, (name, width) in enumerate(corpus)] for shard in passes}  # fmt: skip
        with db.connect(database_url) as conn:
            seed_corpus(conn, shard_urls)
        figures = {shard: run_pass(database_url, shard, shard_urls[shard], gpu, reuse)
                   for shard, reuse in passes.items()}  # fmt: skip
        base, reuse = figures["without_reuse"], figures["with_reuse"]
        common = {"urls": args.urls, "exact_duplicate_share": args.duplicate_share,
                  "gpu_ms_per_image": args.gpu_ms_per_image}  # fmt: skip
        emit(figure="gpu_images_saved", value=base["gpu_images"] - reuse["gpu_images"],
             share=round(1 - reuse["gpu_images"] / base["gpu_images"], 3), with_reuse=reuse["gpu_images"],
             without_reuse=base["gpu_images"], **common)  # fmt: skip
        emit(figure="gpu_requests_saved", value=base["gpu_requests"] - reuse["gpu_requests"],
             with_reuse=reuse["gpu_requests"], without_reuse=base["gpu_requests"], **common)  # fmt: skip
        emit(figure="images_per_s", value=reuse["images_per_s"], baseline=base["images_per_s"],
             ratio=round(reuse["images_per_s"] / base["images_per_s"], 2), with_reuse=reuse, without_reuse=base,
             **common)  # fmt: skip


if __name__ == "__main__":
    main()
