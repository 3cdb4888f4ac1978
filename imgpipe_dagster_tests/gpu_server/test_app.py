"""The HTTP server as a real process with the tiny model: admission, batching, errors, health, auth, idle exit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from imgpipe_dagster.gpu_server import wire
from imgpipe_dagster.gpu_server.launcher import Endpoint, GpuServerLauncher
from imgpipe_dagster.gpu_server.settings import ServerSettings, settings_hash
from imgpipe_dagster.settings_map import medium_server_settings
from imgpipe_dagster_tests.gpu_server.conftest import jpeg

TOKEN = "test-token-123"


AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The shared server never leaves by itself; the idle-exit test starts its own with this timeout.
IDLE_TIMEOUT_S = 3.0
# Every wait on the server ends: a hung server fails the test instead of hanging the suite.
WAIT_S = 60.0
# Batches of 2 and a batch wait far longer than any test: a batch forms exactly when two images are
# queued, so batching and a filled queue are deterministic (tests send even numbers of images).
BATCH = 2


def post_images(
    url: str, images: list[bytes], prompt: str = "analysis_v1", headers: dict | None = None
) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/analyze",
        content=wire.encode_request(images, prompt),
        headers={"Content-Type": wire.CONTENT_TYPE, **(AUTH if headers is None else headers)},
        timeout=120,
    )


def server_settings(model_dir: Path) -> ServerSettings:
    return medium_server_settings(
        str(model_dir),
        device="cpu",
        max_new_tokens=8,
        bearer_token=TOKEN,
        # Batches of exactly BATCH images (from at most BATCH requests): batching and a filled queue are deterministic.
        max_inference_batch_size=BATCH,
        max_batch_images=BATCH,
        batch_wait_timeout=30.0,
        max_inference_queue_size=8,
        max_concurrent_generations=1,
        max_request_bytes=512 * 1024,
        gen_time_default_est=2.0,
    )


@dataclass
class Server:
    launcher: GpuServerLauncher
    endpoint: Endpoint
    settings: ServerSettings

    @property
    def url(self) -> str:
        return self.endpoint.url


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = server_settings(tiny_model_dir)
    launcher = GpuServerLauncher(tmp_path_factory.mktemp("gpu-server"), settings, startup_timeout_s=120)
    try:
        (endpoint,) = launcher.ensure(["cpu"], base_port=0)
        yield Server(launcher, endpoint, settings)
    finally:
        launcher.stop(timeout_s=10)


def health(url: str) -> dict:
    """The whole /health document (the token shows it all)."""
    return httpx.get(f"{url}/health", headers=AUTH, timeout=30).json()


def health_until(url: str, wanted, why: str) -> dict:
    """Poll /health until ``wanted(report)``; fails after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        report = health(url)
        if wanted(report):
            return report
        assert time.monotonic() < deadline, f"gave up waiting for {why}: {report}"
        time.sleep(0.02)


def assert_still_serving(url: str) -> None:
    response = post_images(url, [jpeg("green"), jpeg("yellow")])
    assert response.status_code == 200, response.text
    assert [result["error"] for result in response.json()["results"]] == [None, None]


def test_analyze_returns_text_tokens_and_timings_per_image(server: Server) -> None:
    response = post_images(server.url, [jpeg("red"), jpeg("blue")])
    assert response.status_code == 200
    payload = response.json()
    assert payload["model"] == Path(server.settings.model.model_path).name
    assert payload["prompt"] == "analysis_v1" and payload["prompt_version"].startswith("analysis_v1@")
    assert len(payload["results"]) == 2
    for index, result in enumerate(payload["results"]):
        assert result["index"] == index
        assert result["error"] is None
        assert isinstance(result["text"], str)
        assert result["prompt_tokens"] > 0 and 0 < result["generated_tokens"] <= 8
        assert result["batch_size"] == 2
        assert set(result["timings"]) >= {"queue_ms", "batch_ms", "inference_ms"}
        assert result["timings"]["inference_ms"] > 0
        assert "analysis" in result and "parse_ok" in result


def test_concurrent_requests_are_batched_together(server: Server) -> None:
    before = health(server.url)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: post_images(server.url, [jpeg("white", 56 + i)]), range(8)))
    assert all(response.status_code == 200 for response in responses)
    sizes = [response.json()["results"][0]["batch_size"] for response in responses]
    # Single-image requests only reach a batch size of 2 by sharing a generate() call.
    assert sizes == [BATCH] * 8
    after = health(server.url)
    assert after["processed"] - before["processed"] == 8
    assert after["batches"] - before["batches"] == 8 // BATCH


def test_a_corrupt_image_fails_alone(server: Server) -> None:
    response = post_images(server.url, [jpeg("red"), b"definitely not an image", jpeg("blue"), jpeg("gray")])
    assert response.status_code == 200
    results = response.json()["results"]
    assert [result["error"] is None for result in results] == [True, False, True, True]
    assert "decode" in results[1]["error"] and results[1]["generated_tokens"] == 0
    assert all(results[index]["generated_tokens"] > 0 for index in (0, 2, 3))
    assert health(server.url)["failed"] >= 1
    assert_still_serving(server.url)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        (wire.CONTENT_TYPE, wire.encode_request([], "analysis_v1"), 400, "empty"),
        (wire.CONTENT_TYPE, b"", 400, "bad_request"),
        (wire.CONTENT_TYPE, b'\x00\x00\x00\x05{"a":', 400, "bad_request"),
        (wire.CONTENT_TYPE, wire.encode_request([b"x"], "no_such_prompt"), 400, "unknown_prompt"),
        (wire.CONTENT_TYPE, wire.encode_request([b"x"] * 9, "analysis_v1"), 413, "too_many_images"),
        (wire.CONTENT_TYPE, wire.encode_request([b"x" * 600_000], "analysis_v1"), 413, "too_large"),
        ("application/json", b'{"images": []}', 415, "unsupported_media_type"),
        ("multipart/form-data; boundary=x", b"--x--", 415, "unsupported_media_type"),
        (None, b"raw", 415, "unsupported_media_type"),
    ],
    ids=[
        "empty",
        "no-body",
        "bad-header",
        "unknown-prompt",
        "too-many",
        "too-big",
        "json",
        "multipart",
        "none",
    ],
)
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(
    server: Server, content_type: str | None, body: bytes, status: int, code: str
) -> None:
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    response = httpx.post(f"{server.url}/v1/analyze", content=body, headers=headers, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert_still_serving(server.url)


def test_health_reports_legacy_and_new_fields(server: Server) -> None:
    settings = server.settings
    report = health(server.url)
    assert report["workers"] == settings.max_concurrent_generations
    assert report["queue_size"] == 0
    assert report["status"] == "ready"
    assert report["model"] == Path(settings.model.model_path).name
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["queue_capacity"] == 8 and report["max_inference_batch_size"] == BATCH
    assert report["max_request_images"] == 8
    assert report["in_flight"] == 0 and report["generating"] is False
    assert report["pid"] == server.endpoint.pid and report["port"] == server.endpoint.port
    assert report["gpu"] is None  # no NVML on a CPU server
    for key in (
        "processed",
        "failed",
        "mean_batch_size",
        "mean_generation_ms",
        "images_per_second",
        "uptime_s",
    ):
        assert report[key] >= 0
    assert report["idle_s"] >= 0 and report["idle_timeout_s"] == 0
    # The settings it runs, without the token, and their hash.
    assert report["settings"] == settings.replace(port=server.endpoint.port).to_dict(include_token=False)
    assert "bearer_token" not in report["settings"] and TOKEN not in str(report)
    assert report["settings_hash"] == settings_hash(settings)


def test_health_answers_while_a_batch_generates(server: Server) -> None:
    # Had generate() blocked the event loop, /health would only ever answer between batches and never
    # say "generating". On a loaded machine one request's batches can all finish between two polls, so
    # up to ROUNDS requests are tried (each bounded by WAIT_S); one sighting proves the point.
    rounds = 5
    seen_generating = False
    with ThreadPoolExecutor(1) as pool:
        for _ in range(rounds):
            # several batches back to back, so the poll below has more than one generate() to catch
            pending = pool.submit(
                post_images, server.url, [jpeg(color) for color in ("red", "blue", "gray", "white", "green", "navy")]
            )
            deadline = time.monotonic() + WAIT_S
            while not pending.done() and not seen_generating and time.monotonic() < deadline:
                seen_generating = health(server.url)["generating"]
            assert pending.result(timeout=WAIT_S).status_code == 200
            if seen_generating:
                break
    assert seen_generating, f"/health never reported a batch generating during {rounds} requests"


def test_metrics_are_prometheus_text_with_conventional_names(server: Server) -> None:
    assert_still_serving(server.url)
    response = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "imgpipe_gpu_server_images_processed_total",
        "imgpipe_gpu_server_images_failed_total",
        "imgpipe_gpu_server_queue_depth",
        "imgpipe_gpu_server_batch_size_bucket",
        "imgpipe_gpu_server_generation_seconds_bucket",
    ):
        assert name in text


def test_bearer_token_guards_analyze_and_metrics_and_health_shows_only_liveness_without_it(
    server: Server,
) -> None:
    assert post_images(server.url, [jpeg("red")], headers={}).status_code == 401
    assert (
        post_images(server.url, [jpeg("red")], headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 401
    report = httpx.get(f"{server.url}/health", timeout=30)
    assert report.status_code == 200
    # the legacy fields and liveness, nothing about the process, its files or its settings
    assert report.json() == {"workers": server.settings.max_concurrent_generations, "queue_size": 0,
                             "status": "ready", "auth_required": True}  # fmt: skip
    assert httpx.get(f"{server.url}/health", headers={"Authorization": "Bearer wrong"}, timeout=30).json() == report.json()
    assert_still_serving(server.url)


def test_full_queue_answers_429_with_retry_after(server: Server) -> None:
    with ThreadPoolExecutor(1) as pool:
        # 7 images: three batches of 2 run, the 7th waits in the queue for a partner.
        filling = pool.submit(post_images, server.url, [jpeg("red")] * 7)
        health_until(server.url, lambda report: report["queue_size"] == 1 or filling.done(), "one queued image")
        assert not filling.done()
        refused = post_images(server.url, [jpeg("white")] * 8)  # 1 queued + 8 > 8 places
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1
        partner = post_images(server.url, [jpeg("blue")])
        assert partner.status_code == 200 and partner.json()["results"][0]["batch_size"] == BATCH
        assert filling.result().status_code == 200
    assert_still_serving(server.url)


def test_settings_update_applies_live_fields_and_refuses_the_others(server: Server) -> None:
    running = server.settings.replace(port=server.endpoint.port)
    headers = {**AUTH, "Content-Type": "application/json"}

    def send(settings: ServerSettings, auth: dict = headers) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/settings", content=settings.to_json(include_token=False),
                          headers=auth, timeout=30)  # fmt: skip

    assert send(running, {"Content-Type": "application/json"}).status_code == 401
    refused = send(running.replace_model(enable_tf32=not running.model.enable_tf32))
    assert refused.status_code == 409 and "model.enable_tf32" in refused.json()["error"]["message"]
    bad = httpx.post(f"{server.url}/v1/settings", content=b'{"max_batch_images": "many"}', headers=headers, timeout=30)
    assert bad.status_code == 400
    try:
        changed = send(running.replace(max_inference_queue_size=6).replace_model(max_new_tokens=3))
        assert changed.status_code == 200, changed.text
        report = health(server.url)
        assert report["queue_capacity"] == 6 and report["settings"]["model"]["max_new_tokens"] == 3
        assert report["settings_hash"] != settings_hash(server.settings)
        generated = post_images(server.url, [jpeg("red"), jpeg("blue")]).json()["results"]
        assert all(0 < result["generated_tokens"] <= 3 for result in generated)
    finally:
        assert send(running).status_code == 200
    assert health(server.url)["settings_hash"] == settings_hash(server.settings)


def test_server_exits_after_its_idle_timeout(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = server_settings(tiny_model_dir).replace(idle_timeout_s=IDLE_TIMEOUT_S)
    launcher = GpuServerLauncher(tmp_path / "state", settings, startup_timeout_s=120)
    try:
        (endpoint,) = launcher.ensure(["cpu"], base_port=0)
        assert_still_serving(endpoint.url)
        log_path = Path(launcher.status()[0]["log"])
        process = psutil.Process(endpoint.pid)
        deadline = time.monotonic() + WAIT_S
        while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "idle server still running"
            time.sleep(0.2)
        assert "idle for" in log_path.read_text()
    finally:
        launcher.stop(timeout_s=10)
