"""The same GPU server through its two protocols: native ``/v1/analyze`` (raw bytes, many images per
request) and the OpenAI ``/v1/chat/completions`` (one base64 image per request).

Starts one tiny-model server on the CPU (or ``--model`` on ``--device``), then alternates rounds of
the native client (the baseline, measured in the same run) and the OpenAI client, each sending
``--images`` images in groups of ``--group`` with ``--concurrency`` groups in flight, the way a shard
run does. One JSON line per round and a summary line with the ratio. The figures depend on the
machine's load; the ratio between the two protocols, measured side by side, is the figure to read.

    .venv/bin/python bench/gpu_tier.py                       # tiny model on the CPU
    .venv/bin/python bench/gpu_tier.py --model /models/Qwen2-VL-2B-Instruct --device cuda:0
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time

from PIL import Image

from imgpipe_dagster.gpu_server.client import GpuClient
from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.gpu_server.openai_client import OpenAIClient
from imgpipe_dagster.settings_map import medium_server_settings


def photo(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)).save(buffer, "JPEG")
    return buffer.getvalue()


async def one_round(client: GpuClient, images: list[bytes], group: int, concurrency: int) -> float:
    """Images per second for all ``images`` sent in groups, ``concurrency`` groups at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def send(batch: list[bytes]) -> None:
        async with slots:
            results = await client.analyze(batch)
            assert all(result.ok for result in results), [result.error for result in results]

    started = time.perf_counter()
    await asyncio.gather(*(send(images[i : i + group]) for i in range(0, len(images), group)))
    return len(images) / (time.perf_counter() - started)


async def measure(url: str, options: argparse.Namespace) -> None:
    images = [photo(i) for i in range(options.images)]
    connections = options.concurrency * options.group
    clients = {
        "native": GpuClient(url, timeout_s=600, max_connections=options.concurrency),
        "openai": OpenAIClient(url, max_tokens=options.max_new_tokens, timeout_s=600, max_connections=connections),
    }
    rates: dict[str, list[float]] = {name: [] for name in clients}
    await one_round(clients["native"], images[: options.group], options.group, 1)  # warm-up
    for round_no in range(options.rounds):
        for name, client in clients.items():
            rate = await one_round(client, images, options.group, options.concurrency)
            rates[name].append(rate)
            print(json.dumps({"figure": "gpu_tier_images_per_s", "api": name, "round": round_no,
                              "images": len(images), "group": options.group, "images_per_s": round(rate, 2)}))  # fmt: skip
    for client in clients.values():
        await client.aclose()
    native, openai = statistics.median(rates["native"]), statistics.median(rates["openai"])
    print(json.dumps({"figure": "gpu_tier_summary", "native_images_per_s": round(native, 2),
                      "openai_images_per_s": round(openai, 2), "openai_over_native": round(openai / native, 3)}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: a fresh tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="images per native request / per OpenAI group")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu-tier-bench-") as state:
        model = options.model
        if model is None:
            from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model

            model = str(build_tiny_model(f"{state}/tiny-qwen2-vl"))
        settings = medium_server_settings(model, max_new_tokens=options.max_new_tokens, batch_wait_timeout=0.05)
        launcher = GpuServerLauncher(f"{state}/servers", settings, startup_timeout_s=900)
        try:
            endpoint = launcher.ensure([options.device], base_port=0)[0]
            asyncio.run(measure(endpoint.url, options))
        finally:
            launcher.stop(timeout_s=30)


if __name__ == "__main__":
    main()
