"""Size of the opt-in image store per 10k URLs: what the GPU server gets for each image (resized to the
fetcher's default 448² pixel budget, JPEG quality 90), written as a webdataset tar plus its index.

The images: the test image server's photographs (the bundled samples at 5 sizes from 0.3 to 4
megapixels, as bench/fetch.py uses), fetched and resized by the real fetcher, stored by the real
ImageStore; the size per 10k URLs is the measured bytes per sample times 10,000.

    python bench/image_store.py [--urls 400]

Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgpipe_dagster.engine.image_store import ImageStore  # noqa: E402
from imgpipe_dagster.fetch import ImageFetcher  # noqa: E402
from imgpipe_dagster.settings_map import medium_fetch_settings  # noqa: E402
from imgpipe_dagster_tests.web.image_server import ImageServer, good_photo_urls  # noqa: E402


async def store_all(urls: list[str], base: Path) -> tuple[int, int, int]:
    """(samples stored, bytes of the images, bytes of the downloads)."""
    store = ImageStore(base, "bench")
    settings = medium_fetch_settings(allowed_networks=["127.0.0.0/8"], prefetch_concurrent_downloads=16,
                             per_host_requests_per_s=1e6)  # fmt: skip
    image_bytes = download_bytes = 0
    async with ImageFetcher(settings) as fetcher:
        async for result in fetcher.stream((f"{n:032x}", url) for n, url in enumerate(urls)):
            if result.ok:
                store.add("s000001", result.key, result)
                image_bytes += len(result.image_bytes)
                download_bytes += result.bytes or 0
    store.close()
    return store.written, image_bytes, download_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=400)
    args = parser.parse_args()
    with ImageServer() as server, tempfile.TemporaryDirectory(prefix="imgpipe-store-") as folder:
        base = Path(folder)
        samples, image_bytes, download_bytes = asyncio.run(
            store_all(good_photo_urls(server.base_url, args.urls), base)
        )
        tar_bytes = sum(p.stat().st_size for p in base.rglob("*.tar"))
        index_bytes = sum(p.stat().st_size for p in base.rglob("*.index.json"))
    per_sample = (tar_bytes + index_bytes) / samples
    print(json.dumps({"figure": "image_store_mb_per_10k_urls", "value": round(per_sample * 10_000 / 1e6, 1),
                      "samples": samples, "bytes_per_sample": round(per_sample),
                      "image_bytes_per_sample": round(image_bytes / samples),
                      "tar_and_index_overhead_share": round(1 - image_bytes / (tar_bytes + index_bytes), 3),
                      "downloaded_mb_per_10k_urls": round(download_bytes / samples * 10_000 / 1e6, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
