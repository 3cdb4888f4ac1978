"""The demo's photo server: the sample photos in the demo's formats and widths, and its three failures."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from imgpipe_dagster._demo_photos import photo_names


@pytest.fixture(scope="module")
def demo_base_url():
    process = subprocess.Popen(
        [sys.executable, "-m", "imgpipe_dagster._demo_photos", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode == 0  # stopped through its own shutdown path


@pytest.mark.parametrize("ext,fmt", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("gif", "GIF")])
def test_serves_every_sample_photo_at_the_asked_width(demo_base_url: str, ext: str, fmt: str) -> None:
    name = photo_names()[0]
    response = httpx.get(f"{demo_base_url}/img/{name}.{ext}?w=320", timeout=30)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    assert (image.format, image.width) == (fmt, 320)


def test_the_demo_failures_fail_as_the_demo_expects(demo_base_url: str) -> None:
    assert httpx.get(demo_base_url + "/fault/status/404", timeout=30).status_code == 404
    html = httpx.get(demo_base_url + "/fault/html-as-jpeg", timeout=30)
    assert html.headers["content-type"] == "image/jpeg" and html.content.startswith(b"<!DOCTYPE html>")
    truncated = httpx.get(demo_base_url + "/fault/truncated-jpeg", timeout=30)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(truncated.content)).load()
    assert httpx.get(demo_base_url + "/robots.txt", timeout=30).status_code == 404
    assert httpx.get(demo_base_url + "/img/unicorn.jpg", timeout=30).status_code == 404
