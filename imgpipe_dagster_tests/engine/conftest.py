"""Fixtures of the engine tests: a small image host that logs the order of the requests it gets, and
one GPU server with the tiny model on the CPU."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.settings_map import medium_server_settings


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), "teal").save(buffer, "JPEG")
    return buffer.getvalue()


class LoggedHost:
    """``/ok/<name>``: an image (after ``delay_s``); ``/flaky/<name>``: 503 with ``Retry-After:
    retry_after`` on the first request, an image afterwards; no robots.txt (404). ``requests`` lists
    every path in the order the requests arrived."""

    def __init__(self, delay_s: float = 0.0, retry_after: int = 0) -> None:
        self.requests: list[str] = []
        self._lock = threading.Lock()
        image, host = _jpeg(), self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
                with host._lock:
                    first = self.path not in host.requests
                    host.requests.append(self.path)
                if self.path == "/robots.txt" or (self.path.startswith("/flaky/") and first):
                    self.send_response(404 if self.path == "/robots.txt" else 503)
                    self.send_header("Retry-After", str(retry_after))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                time.sleep(delay_s)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> LoggedHost:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gpu_endpoint(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    """One tiny-model GPU server on the CPU (small images, few tokens), stopped after the module."""
    launcher = GpuServerLauncher(
        tmp_path_factory.mktemp("engine-gpu") / "gpu-servers",
        medium_server_settings(str(tiny_model_dir), max_new_tokens=4, max_inference_batch_size=32,
                               max_concurrent_generations=2, batch_wait_timeout=0.05, idle_timeout_s=600,
                               max_pixels=112 * 112),
        startup_timeout_s=300, extra_env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        (endpoint,) = launcher.ensure(["cpu"], base_port=0)
        yield endpoint.url
    finally:
        launcher.stop()
