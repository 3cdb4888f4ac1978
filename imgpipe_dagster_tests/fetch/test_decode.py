"""Decode and resize as a pure function of bytes: target sizes, refusals before decoding, the hash."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from imgpipe_dagster.fetch import ErrorClass, FetchError, FetchSettings
from imgpipe_dagster.fetch.decode import decode_image, perceptual_hash, sniff_format, target_size
from imgpipe_dagster.paths import resource_path
from imgpipe_dagster.settings_map import medium_fetch_settings
from imgpipe_dagster_tests.web.image_server import ImageServer, rgb_png_bomb

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

SETTINGS = medium_fetch_settings()


def photo(name: str) -> bytes:
    return next(resource_path("sample_images").glob(f"{name}.*")).read_bytes()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@given(st.integers(1, 20_000), st.integers(1, 20_000))
def test_target_size_is_within_budget_in_patch_multiples(width: int, height: int) -> None:
    new_w, new_h = target_size(width, height, 448 * 448, 28)
    assert new_w % 28 == 0 and new_h % 28 == 0
    assert new_w >= 28 and new_h >= 28
    assert new_w * new_h <= 448 * 448
    if min(width, height) >= 1000 and max(width, height) <= 4 * min(width, height):
        # big images of ordinary aspect fill most of the budget and keep their shape (flooring each side
        # to a multiple of 28 costs at most one patch per side)
        assert new_w * new_h >= 0.7 * 448 * 448
        assert abs(new_w / new_h - width / height) / (width / height) < 0.2


@pytest.mark.parametrize(
    ("size", "expected"),
    [((2400, 2400), (448, 448)), ((640, 427), (532, 364)), ((100, 100), (112, 112)), ((5, 5), (28, 28))],
)
def test_target_size_examples(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert target_size(*size, 448 * 448, 28) == expected


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0d", "PNG"),
        (b"GIF89a\x01\x00\x01\x00", "GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"II*\x00\x08\x00\x00\x00", "TIFF"),
        (b"<!DOCTYPE html><html>", None),
        (b"%PDF-1.7\n", None),
        (b"", None),
    ],
)
def test_format_is_sniffed_from_magic_bytes(head: bytes, fmt: str | None) -> None:
    assert sniff_format(head) == fmt


def error_class_of(data: bytes, settings: FetchSettings = SETTINGS) -> ErrorClass:
    with pytest.raises(FetchError) as caught:
        decode_image(data, settings)
    return caught.value.error_class


def test_non_images_truncation_and_garbage_are_classified() -> None:
    jpeg = photo("rocket")
    assert error_class_of(b"<html><body>404</body></html>") is ErrorClass.NOT_AN_IMAGE
    assert error_class_of(jpeg[: len(jpeg) // 2]) is ErrorClass.UNDECODABLE
    assert error_class_of(jpeg[:4] + bytes(2000)) is ErrorClass.UNDECODABLE


def test_pixel_limit_is_checked_from_the_header() -> None:
    server = ImageServer()  # not started: only its payload builders are used
    assert error_class_of(server.huge_jpeg()) is ErrorClass.TOO_LARGE  # a real 100 MP photo
    assert error_class_of(server.png_bomb(8_000)) is ErrorClass.DECOMPRESSION_BOMB  # 64 MP in 8 KB
    assert error_class_of(server.png_bomb(50_000)) is ErrorClass.DECOMPRESSION_BOMB  # 2.5 Gpx in 300 KB
    # the limit is a setting: a 12 MP photo is refused under a 10 MP limit
    big = encode(Image.open(io.BytesIO(photo("retina"))).resize((4000, 3000)), "JPEG", quality=85)
    assert error_class_of(big, medium_fetch_settings(max_image_pixels=10_000_000)) is ErrorClass.TOO_LARGE


def test_an_rgb_png_bomb_is_a_bomb_not_merely_large() -> None:
    # zlib packs at most ~1,030:1, so a black RGB PNG stays near 340 px/byte: 900 MP in 2.6 MB
    bomb = rgb_png_bomb(30_000, 30_000)
    assert len(bomb) < 3_000_000
    with pytest.raises(FetchError) as caught:
        decode_image(bomb, medium_fetch_settings())
    assert caught.value.error_class is ErrorClass.DECOMPRESSION_BOMB
    assert "900,000,000 pixels" in str(caught.value)


def test_jpeg_draft_decoding_keeps_the_picture() -> None:
    source = Image.open(io.BytesIO(photo("retina"))).convert("RGB").resize((2800, 2800))
    result = decode_image(encode(source, "JPEG", quality=90), SETTINGS)
    reference = perceptual_hash(source.resize((448, 448)))
    assert (result.width, result.height, result.resized_width, result.resized_height) == (
        2800,
        2800,
        448,
        448,
    )
    assert bin((result.phash ^ reference) & (2**64 - 1)).count("1") <= 4


def test_phash_is_deterministic_and_signed() -> None:
    image = Image.open(io.BytesIO(photo("coffee"))).convert("RGB")
    first, second = perceptual_hash(image), perceptual_hash(image.copy())
    assert first == second
    assert -(2**63) <= first < 2**63
    hashes = {
        perceptual_hash(Image.open(io.BytesIO(photo(name))).convert("RGB"))
        for name in ("coffee", "rocket", "chelsea")
    }
    assert len(hashes) == 3
