"""The OpenAI-compatible tier: the project's server answers chat completions (real process, tiny model)
and the OpenAI client maps answers and errors as the native client does (429 + Retry-After and
timeouts against a small loopback server that answers on cue)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from imgpipe_dagster.gpu_server.client import RequestRejected, ServerBusy, ServerTimeout
from imgpipe_dagster.gpu_server.launcher import Endpoint, GpuServerLauncher
from imgpipe_dagster.gpu_server.openai_api import ChatRequestError, parse_chat_request
from imgpipe_dagster.gpu_server.openai_client import OpenAIClient, chat_request, openai_base_url
from imgpipe_dagster.gpu_server.prompts import load_prompt
from imgpipe_dagster.settings_map import medium_server_settings
from imgpipe_dagster.throttle.health import probe_one
from imgpipe_dagster_tests.gpu_server.conftest import jpeg

TOKEN = "openai-test-key"
MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    settings = medium_server_settings(str(tiny_model_dir), max_new_tokens=MAX_NEW_TOKENS, bearer_token=TOKEN,
                                      batch_wait_timeout=0.05)  # fmt: skip
    launcher = GpuServerLauncher(tmp_path_factory.mktemp("openai-server"), settings, startup_timeout_s=300)
    try:
        yield launcher.ensure(["cpu"], base_port=0)[0]
    finally:
        launcher.stop(timeout_s=10)


def post_chat(endpoint: Endpoint, body: dict, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{endpoint.url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_models_and_one_chat_completion_in_openai_shape(server: Endpoint, tiny_model_dir: Path) -> None:
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    assert [entry["id"] for entry in models["data"]] == [tiny_model_dir.name]

    response = post_chat(server, chat_request(jpeg("red"), load_prompt("analysis_v1").text, tiny_model_dir.name, 8))

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion" and answer["model"] == tiny_model_dir.name
    (choice,) = answer["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= MAX_NEW_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        (lambda body: body["messages"][1]["content"][1].update(text="describe it freely"), 400, "unknown_prompt"),
        (lambda body: body["messages"][1]["content"].append(body["messages"][1]["content"][0]), 400, "invalid_request"),
        (lambda body: body["messages"][1]["content"][0]["image_url"].update(url="http://example.com/a.jpg"), 400,
         "invalid_request"),
        (lambda body: body.update(model="someone-elses-model"), 404, "model_not_found"),
        (lambda body: body.update(stream=True), 400, "invalid_request"),
    ],
    ids=["free-text-prompt", "two-images", "remote-image", "other-model", "stream"],
)  # fmt: skip
def test_requests_the_server_cannot_serve_get_one_clear_openai_error(server, tiny_model_dir, change, status, code):
    body = chat_request(jpeg("blue"), load_prompt("analysis_v1").text, tiny_model_dir.name, 8)
    change(body)
    response = post_chat(server, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "\n" not in error["message"]


def test_a_wrong_key_is_refused(server: Endpoint, tiny_model_dir: Path) -> None:
    body = chat_request(jpeg("blue"), load_prompt("analysis_v1").text, tiny_model_dir.name, 8)
    assert post_chat(server, body, token="wrong").status_code == 401
    assert post_chat(server, body, token=None).status_code == 401


def test_client_against_the_projects_server_gives_native_shaped_results(server: Endpoint) -> None:
    async def scenario():
        async with OpenAIClient(server.url, api_key=TOKEN, max_tokens=MAX_NEW_TOKENS) as client:
            return await client.analyze([jpeg("red"), b"not an image", jpeg("gray")], "analysis_v1")

    results = asyncio.run(scenario())

    assert [result.ok for result in results] == [True, False, True]
    assert "rejected by the model server" in results[1].error
    for result in (results[0], results[2]):
        assert isinstance(result.text, str) and result.generated_tokens > 0 and result.prompt_tokens > 0
        assert result.prompt_version == load_prompt("analysis_v1").version
        assert result.model and result.timings["inference_ms"] > 0


def test_a_body_nested_too_deep_is_a_request_error_not_a_crash() -> None:
    with pytest.raises(ChatRequestError, match="nested too deep"):
        parse_chat_request(b"[" * 200_000)


def test_base_urls_get_v1_only_when_they_have_no_path() -> None:
    assert openai_base_url("http://gpu-node:8000") == "http://gpu-node:8000/v1"
    assert openai_base_url("http://gpu-node:8000/") == "http://gpu-node:8000/v1"
    assert openai_base_url("https://host/openai/v1/") == "https://host/openai/v1"


class CuedServer:
    """A loopback OpenAI look-alike: answers each chat request with the next cue
    (("busy", retry_after_s), ("slow", seconds) or ("ok", text))."""

    def __init__(self, cues: list[tuple[str, object]]) -> None:
        self.cues = list(cues)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.endswith("/v1/models"):
                    self._answer(200, {"object": "list", "data": [{"id": "cued", "object": "model"}]})
                else:  # a plain-text 404, as servers without a /health route answer
                    self.send_response(404)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"not found")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.requests.append(body)
                kind, value = outer.cues.pop(0)
                if kind == "slow":
                    time.sleep(float(value))
                if kind == "busy":
                    self._answer(429, {"error": {"message": "overloaded", "code": "busy"}}, {"Retry-After": str(value)})
                else:
                    self._answer(200, {"model": "cued", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                                       "choices": [{"message": {"content": str(value)}, "finish_reason": "stop"}]})

            def _answer(self, status: int, document: dict, headers: dict | None = None) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:
                    pass  # the client gave up first (the timeout test)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def cued():
    servers: list[CuedServer] = []

    def make(cues):
        servers.append(CuedServer(cues))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_429_raises_server_busy_with_its_retry_after_then_the_next_call_succeeds(cued) -> None:
    fake = cued([("busy", 7), ("ok", '{"caption": "a cat", "tags": "cat, pet"}')])

    async def scenario():
        async with OpenAIClient(fake.url, model="cued", max_tokens=5) as client:
            with pytest.raises(ServerBusy) as busy:
                await client.analyze([jpeg("red")])
            return busy.value, await client.analyze([jpeg("red")])

    busy, (result,) = asyncio.run(scenario())

    assert busy.retry_after_s == 7
    assert result.ok and result.parse_ok and result.analysis == {"caption": "a cat", "tags": ["cat", "pet"]}
    assert (result.prompt_tokens, result.generated_tokens) == (3, 2)
    request = fake.requests[-1]
    assert request["temperature"] == 0 and request["max_tokens"] == 5 and request["model"] == "cued"
    image_part, text_part = request["messages"][1]["content"]
    assert image_part["image_url"]["url"] == "data:image/jpeg;base64," + base64.b64encode(jpeg("red")).decode()
    assert text_part == {"type": "text", "text": load_prompt("analysis_v1").text}


def test_no_answer_within_the_timeout_raises_server_timeout(cued) -> None:
    fake = cued([("slow", 3.0)])

    async def scenario():
        async with OpenAIClient(fake.url, model="cued", timeout_s=0.5) as client:
            await client.analyze([jpeg("red")])

    with pytest.raises(ServerTimeout):
        asyncio.run(scenario())


def test_a_server_that_refuses_every_image_raises_request_rejected(cued, server: Endpoint) -> None:
    async def scenario():
        async with OpenAIClient(server.url, api_key="wrong-key") as client:
            await client.analyze([jpeg("red"), jpeg("blue")])

    with pytest.raises(RequestRejected) as rejected:
        asyncio.run(scenario())
    assert rejected.value.status_code == 401


def test_without_a_model_name_the_client_asks_the_server_which_it_serves(cued) -> None:
    fake = cued([("ok", "plain words")])

    async def scenario():
        async with OpenAIClient(fake.url) as client:
            return await client.analyze([jpeg("red")])

    (result,) = asyncio.run(scenario())
    assert fake.requests[0]["model"] == "cued"
    assert result.ok and result.text == "plain words" and not result.parse_ok


def test_the_throttle_counts_a_server_without_health_as_up_when_it_lists_models(cued) -> None:
    fake = cued([])
    assert not probe_one(fake.url + "/v1", 2.0).reachable
    health = probe_one(fake.url + "/v1", 2.0, openai=True)
    assert health.reachable and not health.down
