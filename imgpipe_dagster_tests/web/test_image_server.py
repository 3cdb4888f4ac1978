"""The test image server itself: serves what its URL scheme promises, in-process and as a command."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

from imgpipe_dagster_tests.support import free_port
from imgpipe_dagster_tests.web.image_server import ImageServer, good_photo_urls, photo_names


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - loopback test server
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.parametrize(
    ("ext", "variant", "fmt", "mode"),
    [
        ("jpg", "", "JPEG", "RGB"),
        ("png", "", "PNG", "RGB"),
        ("webp", "", "WEBP", "RGB"),
        ("gif", "", "GIF", "P"),
        ("bmp", "", "BMP", "RGB"),
        ("tiff", "", "TIFF", "RGB"),
        ("jpg", "cmyk", "JPEG", "CMYK"),
        ("png", "16bit", "PNG", "I;16"),
        ("png", "alpha", "PNG", "RGBA"),
        ("jpg", "gray", "JPEG", "L"),
    ],
)
def test_photos_come_in_the_promised_format_and_mode(
    image_server: ImageServer, ext: str, variant: str, fmt: str, mode: str
) -> None:
    status, headers, body = get(image_server.image_url("chelsea", ext, width=300, variant=variant))
    image = Image.open(io.BytesIO(body))
    assert status == 200 and headers["Content-Length"] == str(len(body))
    assert (image.format, image.mode, image.width) == (fmt, mode, 300)


def test_exif6_is_stored_sideways_with_its_orientation_tag(image_server: ImageServer) -> None:
    _status, _headers, body = get(image_server.image_url("rocket", "jpg", variant="exif6"))
    image = Image.open(io.BytesIO(body))
    assert image.size == (427, 640)
    assert image.getexif()[0x0112] == 6


def test_good_photo_urls_span_the_requested_sizes(image_server: ImageServer) -> None:
    urls = good_photo_urls(image_server.base_url, 40, min_megapixels=0.3, max_megapixels=4.0)
    assert len(set(urls)) == 40
    assert {url.split("/img/")[1].split(".")[0] for url in urls} == set(photo_names())
    pixels = []
    for url in urls[:5]:
        image = Image.open(io.BytesIO(get(url)[2]))
        pixels.append(image.width * image.height)
    assert 0.28e6 <= min(pixels) and max(pixels) <= 4.2e6


def test_unknown_paths_and_photos_are_404(image_server: ImageServer) -> None:
    assert get(image_server.url("/nothing"))[0] == 404
    assert get(image_server.url("/img/unicorn.jpg"))[0] == 404
    assert get(image_server.url("/fault/unknown-fault"))[0] == 404


def test_runs_as_a_command_and_stops_cleanly() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "imgpipe_dagster_tests.web.image_server", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "listening on" in process.stdout.readline()
        status, _headers, body = get(f"http://127.0.0.1:{port}/img/rocket.jpg")
        assert status == 200 and Image.open(io.BytesIO(body)).size == (640, 427)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # Say why (its signal masks) before cleaning up, so a failure here can be diagnosed.
            with open(f"/proc/{process.pid}/status") as status:
                signals = [line.strip() for line in status if line.startswith(("State", "Sig"))]
            process.kill()
            process.wait()
            pytest.fail(f"the image server ignored SIGTERM for 10 s: {signals}")
    assert process.returncode == 0  # it stopped through its own shutdown path, not by the signal's default


def test_stop_releases_connections_and_port() -> None:
    server = ImageServer().start()
    port = server.port
    get(server.image_url("rocket", "jpg"))  # leaves a keep-alive connection open
    server.stop()
    time.sleep(0.05)
    with socket.socket() as sock:
        sock.settimeout(1)
        assert sock.connect_ex(("127.0.0.1", port)) != 0
