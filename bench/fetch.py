"""Fetch-stage benchmark: imgpipe's ImageFetcher against img2dataset on the same URL list.

Serves N real-photo URLs (0.3-4 MP JPEGs rendered from resources/sample_images) from the test image
server in its own process, then downloads + decodes + resizes them to a 448-class target, first with
``ImageFetcher`` and then with img2dataset, each in a fresh single process with the same concurrency,
and prints one JSON line per figure plus the ratio of images/s.

    .venv/bin/python bench/fetch.py                  # 5,000 URLs, 32 concurrent downloads
    .venv/bin/python bench/fetch.py --count 1000     # quicker

Fairness notes: both run as one worker process with the same number of concurrent downloads; both
compute a sha256 and re-encode JPEG at quality 90; img2dataset resizes with ``center_crop`` to 448×448
(exactly our 448² pixel budget) and writes a webdataset shard, its lightest output; EXIF extraction,
which we do not do, is switched off for it. CPU seconds include every process of each side (the server
process is excluded from both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TARGET_SIDE = 448


def _wait_for(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                response.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the two contenders, each run in its own fresh process ----------------------------------------------


def run_imgpipe(urls_file: Path, concurrency: int, threads: int) -> dict:
    from imgpipe_dagster.fetch import ImageFetcher
    from imgpipe_dagster.settings_map import medium_fetch_settings

    urls = urls_file.read_text().split()
    settings = medium_fetch_settings(
        allowed_networks=["127.0.0.0/8"],
        prefetch_concurrent_downloads=concurrency,
        prefetch_queue_size=2 * concurrency,
        connection_pool_size=concurrency,
        per_host_limit=concurrency,
        # one loopback host serves the whole run: a throughput comparison with img2dataset (which has
        # no per-host rate), not a crawl, so the per-host request rate does not apply
        per_host_requests_per_s=1e6,
        image_resize_threads=threads,
        target_pixels=TARGET_SIDE * TARGET_SIDE,
        # throughput run: img2dataset's 10 s is a per-socket timeout with no total deadline, so give
        # ours the same socket timeout and a total deadline that only a stuck download would reach
        read_timeout_s=10.0,
        prefetch_download_timeout=60.0,
        output_format="JPEG",
        output_quality=90,
    )

    async def main() -> tuple[int, dict[str, int]]:
        ok, errors = 0, {}
        async with ImageFetcher(settings) as fetcher:
            async for result in fetcher.stream(enumerate(urls)):
                if result.ok:
                    ok += 1
                else:
                    errors[result.error.error_class.value] = errors.get(result.error.error_class.value, 0) + 1
        return ok, errors

    started = time.perf_counter()
    ok, errors = asyncio.run(main())
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "ok": ok,
        "errors": errors,
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
    }


def run_img2dataset(urls_file: Path, concurrency: int, output: Path) -> dict:
    from img2dataset import download

    started = time.perf_counter()
    download(
        url_list=str(urls_file),
        input_format="txt",
        output_folder=str(output),
        output_format="webdataset",
        processes_count=1,
        thread_count=concurrency,
        image_size=TARGET_SIDE,
        resize_mode="center_crop",
        encode_format="jpg",
        encode_quality=90,
        extract_exif=False,
        compute_hash="sha256",
        timeout=10,
        retries=0,
        number_sample_per_shard=100_000,
        distributor="multiprocessing",
        disallowed_header_directives=[],
    )
    wall = time.perf_counter() - started
    ok = 0
    for stats in output.glob("*_stats.json"):
        ok += json.loads(stats.read_text()).get("successes", 0)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ok": ok, "wall_s": wall, "peak_rss_mib": max(children, own) / 1024}


# -- orchestration -------------------------------------------------------------------------------------


def _run_side(args: list[str]) -> tuple[dict, float]:
    cpu_before = _children_cpu_s()
    # own process group: img2dataset forks workers, and a timeout must not leave them behind
    process = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=3600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise SystemExit(f"bench side {args[:2]} ran past an hour") from None
    cpu = _children_cpu_s() - cpu_before
    if process.returncode != 0:
        raise SystemExit(f"bench side {args[:2]} failed:\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), cpu


def _report(common: dict, name: str, side: dict, cpu: float) -> float:
    rate = side["ok"] / side["wall_s"] if side["wall_s"] else 0.0
    line = {
        **common,
        "impl": name,
        "ok": side["ok"],
        "wall_s": round(side["wall_s"], 2),
        "images_per_s": round(rate, 1),
        "cpu_s_per_image": round(cpu / max(1, side["ok"]), 4),
        "peak_rss_mib": round(side["peak_rss_mib"], 1),
    }
    if side.get("errors"):
        line["errors"] = side["errors"]
    print(json.dumps(line), flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=5000, help="URLs to fetch (default 5000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent downloads, both sides")
    parser.add_argument("--threads", type=int, default=2, help="imgpipe decode/resize threads")
    parser.add_argument("--side", choices=["imgpipe", "img2dataset"], help=argparse.SUPPRESS)
    parser.add_argument("--urls", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side == "imgpipe":
        print(json.dumps(run_imgpipe(args.urls, args.concurrency, args.threads)))
        return
    if args.side == "img2dataset":
        print(json.dumps(run_img2dataset(args.urls, args.concurrency, args.output)))
        return

    from imgpipe_dagster_tests.web.image_server import good_photo_urls

    work = Path(tempfile.mkdtemp(prefix="imgpipe-bench-fetch-"))
    server = subprocess.Popen(
        [sys.executable, "-m", "imgpipe_dagster_tests.web.image_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        # its first line says where it listens: port 0, so the system picked a free one
        listening = re.search(r"listening on (http://127\.0\.0\.1:\d+)", server.stdout.readline())
        if not listening:
            raise RuntimeError("the image server did not start")
        base = listening.group(1)
        _wait_for(base + "/health")
        # the URL scheme is deterministic: build the list here, then let the server render each
        # distinct photo once before timing starts
        urls = good_photo_urls(base, args.count, min_megapixels=0.3, max_megapixels=4.0)
        distinct = {url.split("&n=")[0].split("?n=")[0] for url in urls}
        for url in sorted(distinct):
            _wait_for(url)
        urls_file = work / "urls.txt"
        urls_file.write_text("\n".join(urls) + "\n")
        common = {"bench": "fetch", "urls": len(urls), "distinct_files": len(distinct), "target": TARGET_SIDE}
        common.update(concurrency=args.concurrency, processes=1, cpus=os.cpu_count())

        ours, ours_cpu = _run_side(
            [
                "--side",
                "imgpipe",
                "--urls",
                str(urls_file),
                "--concurrency",
                str(args.concurrency),
                "--threads",
                str(args.threads),
            ]
        )
        ours_rate = _report(common, "imgpipe", ours, ours_cpu)
        theirs, theirs_cpu = _run_side(
            [
                "--side",
                "img2dataset",
                "--urls",
                str(urls_file),
                "--concurrency",
                str(args.concurrency),
                "--output",
                str(work / "img2dataset"),
            ]
        )
        figures = {"imgpipe": ours_rate, "img2dataset": _report(common, "img2dataset", theirs, theirs_cpu)}
        ratio = figures["imgpipe"] / figures["img2dataset"] if figures["img2dataset"] else float("inf")
        print(
            json.dumps(
                {
                    **common,
                    "figure": "images_per_s_ratio_imgpipe_over_img2dataset",
                    "ratio": round(ratio, 2),
                    "target_ratio": 1.5,
                }
            ),
            flush=True,
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
