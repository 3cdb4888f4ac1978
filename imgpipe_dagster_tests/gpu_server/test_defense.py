"""The GPU server facing a hostile network, as a real process with the tiny model: pixel bombs, deep
JSON, clients that vanish mid-body, slowloris and half-open connections, a connection flood, and
answers that give away nothing about the server's files."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import psutil
import pytest

from imgpipe_dagster.gpu_server import wire
from imgpipe_dagster.gpu_server.launcher import Endpoint, GpuServerLauncher
from imgpipe_dagster.paths import resource_path
from imgpipe_dagster_tests.gpu_server.conftest import jpeg
from imgpipe_dagster_tests.gpu_server.test_app import (
    AUTH,
    WAIT_S,
    assert_still_serving,
    post_images,
    server_settings,
)
from imgpipe_dagster_tests.web.image_server import rgb_png_bomb

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 48
# Decoding a 144 MP RGB image takes at least 432 MB; checking its header, next to nothing.
DECODE_WOULD_TAKE_BYTES = 144_000_000 * 3


@pytest.fixture(scope="module")
def guarded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Endpoint, Path]]:
    settings = server_settings(tiny_model_dir).replace(
        header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S, max_connections=MAX_CONNECTIONS,
        max_request_bytes=1024 * 1024,
    )  # fmt: skip
    launcher = GpuServerLauncher(tmp_path_factory.mktemp("guarded"), settings, startup_timeout_s=120)
    try:
        (endpoint,) = launcher.ensure(["cpu"], base_port=0)
        yield endpoint, Path(launcher.status()[0]["log"])
    finally:
        launcher.stop(timeout_s=10)


def open_sockets(endpoint: Endpoint, count: int, first_bytes: bytes, stack: ExitStack) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT_S))
        if first_bytes:
            sock.sendall(first_bytes)
        sockets.append(sock)
    return sockets


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (waits at most 0.05 s for the answer)."""
    sock.settimeout(0.05)
    try:
        while sock.recv(65536):
            pass  # an answer (a 4xx) before the close is fine
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def client_connections(pid: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED)


def wait_until(condition, why: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {why}"
        time.sleep(0.1)


def test_an_image_over_the_pixel_cap_fails_alone_and_is_never_decoded(guarded) -> None:
    endpoint, _ = guarded
    bomb = rgb_png_bomb(12_000, 12_000)  # 144 MP in about 420 KB
    server = psutil.Process(endpoint.pid)
    before = server.memory_info().rss
    response = post_images(endpoint.url, [bomb, jpeg("red")])
    grown = server.memory_info().rss - before
    assert response.status_code == 200, response.text
    bombed, fine = response.json()["results"]
    # the fetcher's cap and the fetcher's taxonomy: both sides of the wire say the same
    assert bombed["error"].startswith("decompression_bomb: 144,000,000 pixels"), bombed["error"]
    assert "limit 40,000,000 pixels" in bombed["error"]
    assert fine["error"] is None
    assert grown < DECODE_WOULD_TAKE_BYTES / 2, f"RSS grew by {grown:,} bytes: the image was decoded"


def test_json_nested_too_deep_is_a_400(guarded) -> None:
    endpoint, _ = guarded
    header = b"[" * 200_000
    response = httpx.post(f"{endpoint.url}/v1/analyze", content=struct.pack(">I", len(header)) + header,
                          headers={"Content-Type": wire.CONTENT_TYPE, **AUTH}, timeout=WAIT_S)  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "bad_request", "message": "header is JSON nested too deep"}
    assert_still_serving(endpoint.url)


def test_an_unknown_prompt_is_named_without_the_servers_paths(guarded) -> None:
    endpoint, _ = guarded
    response = post_images(endpoint.url, [jpeg("red")], prompt="no_such_prompt")
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "no_such_prompt" in message and "analysis_v1" in message  # what there is instead
    assert str(resource_path("prompts")) not in message and "/" not in message


def test_a_client_gone_mid_body_writes_one_log_line(guarded) -> None:
    endpoint, log_path = guarded
    start = len(log_path.read_text())
    head = (f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: {wire.CONTENT_TYPE}\r\n"
            f"Authorization: {AUTH['Authorization']}\r\nContent-Length: 100000\r\n\r\n").encode()  # fmt: skip
    gone = 3
    for _ in range(gone):
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=WAIT_S) as sock:
            sock.sendall(head + b"\0" * 1000)

    def written() -> str:
        return log_path.read_text()[start:]

    wait_until(lambda: written().count("disconnected before its request body") == gone, "a line per client")
    assert len(written().splitlines()) == gone, written()  # and nothing else: no traceback
    assert_still_serving(endpoint.url)
    assert "Traceback" not in written()


def test_slow_headers_and_slow_bodies_are_cut_off(guarded) -> None:
    endpoint, _ = guarded
    slow_head = b"POST /v1/analyze HTTP/1.1\r\nHost: x\r\n"  # and never the blank line
    slow_body = (f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: {wire.CONTENT_TYPE}\r\n"
                 f"Authorization: {AUTH['Authorization']}\r\nContent-Length: 5000\r\n\r\n").encode() + b"\0" * 10  # fmt: skip
    with ExitStack() as stack:
        silent = open_sockets(endpoint, 10, b"", stack)
        sockets = silent + open_sockets(endpoint, 10, slow_head, stack) + open_sockets(endpoint, 5, slow_body, stack)
        wait_until(lambda: all(closed_by_server(sock) for sock in sockets), "the server closes every laggard")
        wait_until(lambda: client_connections(endpoint.pid) == 0, "no connection left on the server's side")
    assert_still_serving(endpoint.url)


def test_a_flood_of_idle_connections_stays_under_the_cap_and_health_answers(guarded) -> None:
    endpoint, _ = guarded
    with ExitStack() as stack:
        open_sockets(endpoint, 2 * MAX_CONNECTIONS, b"", stack)
        wait_until(lambda: client_connections(endpoint.pid) <= MAX_CONNECTIONS, "the cap holds")
        # a prompt client gets in while the cap is full of idle ones: the oldest idle one makes room
        answer = httpx.get(f"{endpoint.url}/health", headers=AUTH, timeout=WAIT_S)
        assert answer.status_code == 200 and answer.json()["status"] == "ready"
        assert client_connections(endpoint.pid) <= MAX_CONNECTIONS


def test_gpu_server_start_takes_the_token_from_the_environment_and_never_shows_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    token = "environment-token-" + tmp_path.name
    state = str(tmp_path / "state")
    command = [sys.executable, "-m", "imgpipe_dagster.cli", "gpu-server", "start", "--state-dir", state,
               "--model", str(tiny_model_dir), "--devices", "cpu", "--base-port", "0", "--startup-timeout", "120"]  # fmt: skip
    starter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "IMGPIPE_GPU_TOKEN": token})  # fmt: skip
    try:
        # every command line on the machine, for as long as the servers start: the token is in none
        seen = 0
        while starter.poll() is None:
            for process in psutil.process_iter(["cmdline"]):
                assert token not in " ".join(process.info["cmdline"] or []), process.info["cmdline"]
                seen += 1
            time.sleep(0.2)
        out, err = starter.communicate(timeout=WAIT_S)
        assert starter.returncode == 0, err
        assert seen > 0
        (endpoint,) = json.loads(out)
        url = endpoint["url"]
        assert token not in " ".join(psutil.Process(endpoint["pid"]).cmdline())
        assert httpx.get(f"{url}/metrics", timeout=WAIT_S).status_code == 401
        guarded = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {token}"}, timeout=WAIT_S).json()
        assert guarded["auth_required"] is True and guarded["pid"] == endpoint["pid"]
        assert set(httpx.get(f"{url}/health", timeout=WAIT_S).json()) == {"workers", "queue_size", "status", "auth_required"}
    finally:
        starter.kill()
        subprocess.run([*command[:4], "stop", "--state-dir", state], timeout=WAIT_S, check=False)
