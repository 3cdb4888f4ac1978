"""Pipeline benchmark (CPU): end-to-end images/s with the tiny model and the share of time per stage,
and the result writer alone against executemany with the same upsert semantics, in the same run.

    python bench/pipeline.py [--urls 400] [--writer-rows 20000]

Prints one JSON line per figure. Uses the embedded PostgreSQL (or IMGPIPE_DATABASE_URL) with a
scratch database that is dropped at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_db import fresh_database  # noqa: E402

from imgpipe_dagster.store import database as db  # noqa: E402
from imgpipe_dagster.store.work import (  # noqa: E402
    UrlOutcome,
    claim,
    write_outcomes,
    write_outcomes_executemany,
)


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def seed(conn, shard: str, urls: list[str]) -> None:
    conn.execute("INSERT INTO shards (shard_id, shard_no, url_count) VALUES (%s, "
                 "(SELECT coalesce(max(shard_no), 0) + 1 FROM shards), %s)", (shard, len(urls)))
    with conn.cursor().copy("COPY corpus_urls (url_hash, url, shard_id) FROM STDIN") as copy:
        for url in urls:
            copy.write_row((hashlib.md5(url.encode()).digest(), url, shard))
    conn.commit()


def result_row(i: int) -> dict:
    # about 600 bytes per row, like a real analysis
    caption = f"a photograph of object {i} on a table near a window with soft daylight " * 2
    return {
        "http_status": 200, "content_type": "image/jpeg", "bytes": 123456, "width": 1024, "height": 768,
        "format": "JPEG", "sha256": hashlib.sha256(str(i).encode()).hexdigest(), "phash": i * 7919,
        "model_text": caption, "analysis": {"caption": caption[:120], "tags": ["table", "window", "daylight"]},
        "parse_ok": True, "model": "Qwen2-VL-2B-Instruct", "prompt_version": "analysis_v1", "prompt_tokens": 300,
        "generated_tokens": 64, "download_ms": 85.0, "inference_ms": 1200.0, "gpu": "gpu0",
    }  # fmt: skip


def bench_writer(url: str, rows: int, chunk: int) -> None:
    timings = {}
    for name, writer in (("copy_upsert", write_outcomes), ("executemany", write_outcomes_executemany)):
        with db.connect(url) as conn:
            shard = f"w-{name}"
            seed(conn, shard, [f"http://bench.test/{name}/{i}.jpg" for i in range(rows)])
            claimed = claim(conn, "bench", [shard], rows, 600)
            outcomes = [UrlOutcome(c.url_hash, c.url, c.shard_id, "done", 1, result=result_row(i))
                        for i, c in enumerate(claimed)]  # fmt: skip
            started = time.perf_counter()
            for start in range(0, len(outcomes), chunk):
                writer(conn, "bench", outcomes[start : start + chunk])
            timings[name] = time.perf_counter() - started
            emit(figure=f"writer_{name}_rows_per_s", value=round(rows / timings[name]), rows=rows, chunk=chunk)
    emit(figure="writer_copy_upsert_vs_executemany", value=round(timings["executemany"] / timings["copy_upsert"], 2),
         unit="x faster")  # fmt: skip


def bench_end_to_end(url: str, n_urls: int, devices: list[str]) -> None:
    from imgpipe_dagster.engine.runner import ShardRunner
    from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
    from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model
    from imgpipe_dagster.profiles import resolve
    from imgpipe_dagster.settings_map import (
        engine_settings,
        medium_fetch_settings,
        model_settings,
        server_settings,
    )
    from imgpipe_dagster_tests.web.image_server import ImageServer, photo_names

    state = Path(tempfile.mkdtemp(prefix="imgpipe-bench-"))
    model = build_tiny_model(state / "tiny")
    worker, gpu = resolve("medium", {"images_per_request": 16, "chunk_size": 100})
    settings = server_settings(gpu, model_settings(gpu, str(model)))
    launcher = GpuServerLauncher(state / "gpu-servers", settings, startup_timeout_s=300)
    try:
        endpoints = [e.url for e in launcher.ensure(devices, base_port=0)]
        with ImageServer() as images, db.connect(url) as conn:
            names = photo_names()
            urls = [images.image_url(names[i % len(names)], "jpg", width=640 + (i % 5) * 128, n=i) for i in range(n_urls)]
            seed(conn, "e2e", urls)
            # one loopback host serves every URL: the per-host request rate (politeness) would be the
            # bottleneck measured, so it does not apply here
            fetch = medium_fetch_settings(allowed_networks=["127.0.0.0/8"], prefetch_concurrent_downloads=16,
                                  per_host_requests_per_s=1e6)  # fmt: skip
            runner = ShardRunner(url, f"bench-{uuid.uuid4().hex[:6]}", ["e2e"], engine_settings(worker, fetch),
                                 endpoints, progress=lambda line, summary: None)  # fmt: skip
            started = time.perf_counter()
            summary = runner.run()
            elapsed = time.perf_counter() - started
        stages = summary.stage_seconds
        busy = sum(stages.values()) or 1.0
        emit(figure="end_to_end_images_per_s", value=round(summary.urls_done / elapsed, 2), urls=n_urls,
             done=summary.urls_done, devices=devices, model="tiny random Qwen2-VL (CPU)")  # fmt: skip
        for stage, seconds in stages.items():
            emit(figure=f"stage_share_{stage}", value=round(seconds / busy, 3), busy_seconds=seconds)
        emit(figure="download_ms_p50", value=summary.download_ms_p50)
        emit(figure="inference_ms_p50", value=summary.inference_ms_p50)
    finally:
        launcher.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=400)
    parser.add_argument("--writer-rows", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--devices", default="cpu,cpu")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    with fresh_database() as url:
        bench_writer(url, args.writer_rows, args.chunk)
        if not args.skip_end_to_end:
            bench_end_to_end(url, args.urls, args.devices.split(","))


if __name__ == "__main__":
    main()
