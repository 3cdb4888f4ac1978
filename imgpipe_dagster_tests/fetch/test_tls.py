"""TLS failures (an untrusted certificate, a server that does not speak TLS) end as tls_error, once."""

from __future__ import annotations

import asyncio
import http.server
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgpipe_dagster.fetch import FetchResult, ImageFetcher
from imgpipe_dagster.fetch.errors import ErrorClass
from imgpipe_dagster_tests.web.image_server import fault_test_settings

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"\xff\xd8\xff\xd9"
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _serve(server: http.server.ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def self_signed_https(tmp_path: Path) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 whose certificate no trust store knows."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serve(server)


@pytest.fixture
def plain_http() -> Iterator[str]:
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler))


def _fetch(url: str) -> FetchResult:
    async def scenario() -> FetchResult:
        async with ImageFetcher(fault_test_settings()) as fetcher:
            return await fetcher.fetch(url, key=0)

    return asyncio.run(scenario())


def test_an_untrusted_certificate_is_a_tls_error(self_signed_https: str) -> None:
    result = _fetch(f"https://{self_signed_https}/a.jpg")
    assert not result.ok
    assert result.error.error_class is ErrorClass.TLS_ERROR
    assert "certificate" in result.error.message.lower()
    assert not result.error.error_class.retryable  # a misconfigured site stays misconfigured


def test_https_to_a_server_without_tls_is_a_tls_error(plain_http: str) -> None:
    result = _fetch(f"https://{plain_http}/a.jpg")
    assert not result.ok
    assert result.error.error_class is ErrorClass.TLS_ERROR


def test_the_same_server_over_http_is_fetched(plain_http: str) -> None:
    # The control: the failures above come from TLS, not from the server or the address policy.
    result = _fetch(f"http://{plain_http}/a.jpg")
    assert result.http_status == 200
