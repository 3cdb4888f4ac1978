"""Successful fetches: every format and variant decodes to the right facts and a model-ready image."""

from __future__ import annotations

import asyncio
import hashlib
import io
import urllib.request

import pytest
from PIL import Image

from imgpipe_dagster.fetch import FetchResult, ImageFetcher
from imgpipe_dagster_tests.web.image_server import ImageServer, fault_test_settings

SIGNED_64 = range(-(2**63), 2**63)


def fetch_many(urls: list[str], **overrides) -> list[FetchResult]:
    # generous timeouts: the server renders each size/format on first request, and these tests are
    # about what a successful fetch returns, not about deadlines
    overrides = {"read_timeout_s": 20.0, "prefetch_download_timeout": 30.0, **overrides}

    async def scenario() -> list[FetchResult]:
        async with ImageFetcher(fault_test_settings(**overrides)) as fetcher:
            return [await fetcher.fetch(url, key=index) for index, url in enumerate(urls)]

    return asyncio.run(scenario())


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & (2**64 - 1)).count("1")


def server_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url) as response:  # noqa: S310 - loopback test server
        return response.read()


def decoded(result: FetchResult) -> Image.Image:
    image = Image.open(io.BytesIO(result.image_bytes))
    image.load()
    return image


def test_good_cases_decode_with_all_result_facts(image_server: ImageServer) -> None:
    cases = image_server.good_cases()
    results = fetch_many([case.url for case in cases])
    settings = fault_test_settings()
    for case, result in zip(cases, results, strict=True):
        assert result.ok, (case.kind, result.error)
        assert result.error is None
        assert result.http_status == 200
        assert result.width and result.height
        assert result.resized_width % settings.patch_multiple == 0
        assert result.resized_height % settings.patch_multiple == 0
        assert result.resized_width * result.resized_height <= settings.target_pixels
        assert result.phash in SIGNED_64
        assert len(result.sha256) == 64 and result.bytes > 0
        assert result.download_ms >= 0 and result.decode_ms >= 0
        image = decoded(result)
        assert (image.format, image.mode, image.size) == (
            "JPEG",
            "RGB",
            (result.resized_width, result.resized_height),
        )


@pytest.mark.parametrize(("ext", "fmt"), [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("gif", "GIF")])
def test_format_size_sha256_and_byte_count_describe_the_downloaded_file(
    image_server: ImageServer, ext: str, fmt: str
) -> None:
    url = image_server.image_url("coffee", ext)
    original = server_bytes(url)  # also renders the file once, so the fetch below never waits on it
    [result] = fetch_many([url])
    assert (result.format, result.width, result.height) == (fmt, 600, 400)
    assert result.bytes == len(original)
    assert result.sha256 == hashlib.sha256(original).hexdigest()
    assert (result.resized_width, result.resized_height) == (532, 364)


def test_format_comes_from_the_bytes_not_the_content_type(image_server: ImageServer) -> None:
    [result] = fetch_many([image_server.url("/fault/png-as-jpeg")])
    assert result.ok
    assert result.content_type == "image/jpeg"
    assert result.format == "PNG"


def test_exif_rotation_is_applied(image_server: ImageServer) -> None:
    upright, rotated = fetch_many(
        [image_server.image_url("rocket", "jpg"), image_server.image_url("rocket", "jpg", variant="exif6")]
    )
    assert (rotated.width, rotated.height) == (upright.width, upright.height) == (640, 427)
    assert (rotated.resized_width, rotated.resized_height) == (upright.resized_width, upright.resized_height)
    assert hamming(rotated.phash, upright.phash) <= 6


def test_transparency_is_composited_on_white(image_server: ImageServer) -> None:
    for ext in ("png", "webp", "gif"):
        [result] = fetch_many([image_server.image_url("chelsea", ext, variant="alpha")])
        image = decoded(result).convert("L")
        left = image.crop((0, 0, image.width // 2 - 8, image.height))
        right = image.crop((image.width // 2 + 8, 0, image.width, image.height))
        assert min(left.getextrema()) >= 245, ext  # transparent half: white
        assert right.getextrema()[0] < 200, ext  # the photo is still there


@pytest.mark.parametrize(
    ("variant", "ext", "name"),
    [("cmyk", "jpg", "coffee"), ("16bit", "png", "astronaut"), ("gray", "jpg", "astronaut")],
)
def test_unusual_colour_modes_look_like_the_plain_photo(
    image_server: ImageServer, variant: str, ext: str, name: str
) -> None:
    plain, unusual = fetch_many(
        [image_server.image_url(name, "png"), image_server.image_url(name, ext, variant=variant)]
    )
    assert unusual.ok, unusual.error
    assert hamming(plain.phash, unusual.phash) <= 8
    # 16-bit values are scaled to 8 bits, not clipped to white
    plain_mean = sum(decoded(plain).convert("L").getdata()) / (plain.resized_width * plain.resized_height)
    unusual_mean = sum(decoded(unusual).convert("L").getdata()) / (
        unusual.resized_width * unusual.resized_height
    )
    assert abs(plain_mean - unusual_mean) < 12


@pytest.mark.parametrize("ext", ["gif", "webp"])
def test_animations_use_their_first_frame(image_server: ImageServer, ext: str) -> None:
    still, animated = fetch_many(
        [image_server.image_url("rocket", "png"), image_server.image_url("rocket", ext, variant="anim")]
    )
    assert animated.ok, animated.error
    assert hamming(still.phash, animated.phash) <= 8


def test_large_jpegs_are_downscaled_to_the_budget(image_server: ImageServer) -> None:
    [result] = fetch_many([image_server.image_url("retina", "jpg", width=2400)])
    assert (result.width, result.height) == (2400, 2400)
    assert (result.resized_width, result.resized_height) == (448, 448)


def test_png_output_is_available_for_exact_pixels(image_server: ImageServer) -> None:
    [result] = fetch_many([image_server.image_url("rocket", "jpg")], output_format="PNG")
    assert decoded(result).format == "PNG"


def test_phash_tells_photos_apart_and_survives_resizing(image_server: ImageServer) -> None:
    small, large, other = fetch_many(
        [
            image_server.image_url("hubble_deep_field", "jpg", width=500),
            image_server.image_url("hubble_deep_field", "jpg", width=1800),
            image_server.image_url("coffee", "jpg"),
        ]
    )
    assert hamming(small.phash, large.phash) <= 6
    assert hamming(small.phash, other.phash) >= 16


def test_keepalive_reuses_one_connection_and_can_be_switched_off() -> None:
    with ImageServer() as server:
        urls = [server.image_url("rocket", "jpg", n=i) for i in range(5)]
        fetch_many(urls)
        with_keepalive = server.connections_opened
        server.reset_counters()
        fetch_many(urls, enable_keepalive=False)
        without_keepalive = server.connections_opened
    assert with_keepalive == 1
    assert without_keepalive == 5 + 1  # and robots.txt, asked once


def test_per_host_limit_caps_concurrent_downloads_from_one_host() -> None:
    async def scenario(server: ImageServer) -> list[FetchResult]:
        settings = fault_test_settings(per_host_limit=2, prefetch_concurrent_downloads=8)
        async with ImageFetcher(settings) as fetcher:
            urls = [server.image_url("rocket", "jpg", n=i) + "&delay=0.2" for i in range(8)]
            return await asyncio.gather(*(fetcher.fetch(url) for url in urls))

    with ImageServer() as server:
        results = asyncio.run(scenario(server))
        assert all(r.ok for r in results)
        assert server.max_in_flight == 2


def test_user_agent_and_host_header_are_sent(image_server: ImageServer) -> None:
    [result] = fetch_many(
        [image_server.image_url("rocket", "jpg", n="ua-check")], user_agent="imgpipe-test/1.0"
    )
    assert result.ok
    recent = list(image_server.recent)
    index = recent.index((f"127.0.0.1:{image_server.port}", "/img/rocket.jpg?n=ua-check"))
    assert list(image_server.user_agents)[index] == "imgpipe-test/1.0"
