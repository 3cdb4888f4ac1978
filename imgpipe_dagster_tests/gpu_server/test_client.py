"""The async client against a real tiny-model server process: results, and errors mapped to what a caller does."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imgpipe_dagster.gpu_server.client import (
    GpuClient,
    ImageAnalysis,
    RequestRejected,
    ServerBusy,
    ServerTimeout,
    ServerUnavailable,
)
from imgpipe_dagster.gpu_server.health import ServerHealth
from imgpipe_dagster.gpu_server.launcher import Endpoint, GpuServerLauncher
from imgpipe_dagster.settings_map import medium_server_settings
from imgpipe_dagster_tests.gpu_server.conftest import jpeg

TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    settings = medium_server_settings(
        str(tiny_model_dir),
        max_new_tokens=4,
        bearer_token=TOKEN,
        # Batches of exactly 2 (the wait outlasts any test): batching and a filled queue are deterministic.
        max_inference_batch_size=2,
        max_batch_images=2,
        batch_wait_timeout=30.0,
        max_inference_queue_size=8,
        max_concurrent_generations=1,
    )
    launcher = GpuServerLauncher(tmp_path_factory.mktemp("client-server"), settings, startup_timeout_s=120)
    try:
        yield launcher.ensure(["cpu"], base_port=0)[0]
    finally:
        launcher.stop(timeout_s=10)


def test_analyze_returns_one_result_per_image_in_order(endpoint: Endpoint) -> None:
    async def scenario() -> list[ImageAnalysis]:
        async with GpuClient(endpoint.url, token=TOKEN) as client:
            return await client.analyze([jpeg("red"), b"not an image", jpeg("blue"), jpeg("gray")])

    results = asyncio.run(scenario())
    assert [result.ok for result in results] == [True, False, True, True]
    assert results[1].error and results[1].generated_tokens == 0
    for result in (results[0], results[2], results[3]):
        assert isinstance(result.text, str) and result.generated_tokens > 0 and result.prompt_tokens > 0
        assert result.prompt_version.startswith("analysis_v1@") and result.model
        assert {"queue_ms", "batch_ms", "inference_ms"} <= set(result.timings)


def test_concurrent_small_requests_from_one_client_share_batches(endpoint: Endpoint) -> None:
    async def scenario() -> tuple[list[list[ImageAnalysis]], ServerHealth]:
        async with GpuClient(endpoint.url, token=TOKEN) as client:
            answers = await asyncio.gather(*(client.analyze([jpeg("white", 56 + i)]) for i in range(6)))
            return answers, await client.health()

    answers, health = asyncio.run(scenario())
    assert all(answer[0].ok for answer in answers)
    assert [answer[0].batch_size for answer in answers] == [2] * 6
    assert health.status == "ready" and health.queue_size == 0 and health.port == endpoint.port


def test_full_queue_raises_server_busy_with_the_retry_delay(endpoint: Endpoint) -> None:
    async def scenario() -> ServerBusy:
        async with GpuClient(endpoint.url, token=TOKEN) as client:
            # 7 images: three batches of 2 run, the 7th waits in the queue for a partner.
            filling = asyncio.create_task(client.analyze([jpeg("red")] * 7))
            deadline = time.monotonic() + 60
            while (await client.health()).queue_size != 1:
                assert not filling.done() and time.monotonic() < deadline
                await asyncio.sleep(0.02)
            with pytest.raises(ServerBusy) as busy:
                await client.analyze([jpeg("blue")] * 8)
            assert (await client.analyze([jpeg("green")]))[0].ok
            assert all(result.ok for result in await filling)
            return busy.value

    busy = asyncio.run(scenario())
    assert busy.retry_after_s >= 1


@pytest.mark.parametrize(
    ("token", "images", "prompt", "status"),
    [
        ("wrong", [b"x"], "analysis_v1", 401),
        (TOKEN, [b"x"], "no_such_prompt", 400),
        (TOKEN, [], "analysis_v1", 400),
        (TOKEN, [b"x"] * 9, "analysis_v1", 413),
    ],
    ids=["bad-token", "unknown-prompt", "empty", "too-many"],
)
def test_requests_the_server_refuses_raise_request_rejected(
    endpoint: Endpoint, token: str, images: list[bytes], prompt: str, status: int
) -> None:
    async def scenario() -> None:
        async with GpuClient(endpoint.url, token=token) as client:
            with pytest.raises(RequestRejected) as rejected:
                await client.analyze(images, prompt=prompt)
            assert rejected.value.status_code == status and rejected.value.code

    asyncio.run(scenario())


def test_nothing_listening_raises_server_unavailable() -> None:
    async def scenario(port: int) -> None:
        async with GpuClient(f"http://127.0.0.1:{port}", timeout_s=5) as client:
            with pytest.raises(ServerUnavailable):
                await client.analyze([b"x"])
            with pytest.raises(ServerUnavailable):
                await client.health()

    # A port held by this test without listening: connections are refused, and no one else can take it.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        asyncio.run(scenario(held.getsockname()[1]))


def test_server_errors_and_timeouts_map_to_server_unavailable() -> None:
    """Status mapping only (a real server will not produce these on demand): scripted transport."""

    def respond(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(
            503, headers={"Retry-After": "7"}, json={"error": {"code": "loading", "message": "x"}}
        )

    async def scenario() -> None:
        async with GpuClient("http://gpu", transport=httpx.MockTransport(respond)) as client:
            with pytest.raises(ServerUnavailable) as unavailable:
                await client.analyze([b"x"])
            assert unavailable.value.status_code == 503 and unavailable.value.retry_after_s == 7
            with pytest.raises(ServerTimeout):
                await client.health()

    asyncio.run(scenario())
