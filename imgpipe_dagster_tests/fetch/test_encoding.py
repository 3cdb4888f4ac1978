"""Content-Encoding removal never outgrows its cap: gzip, deflate and brotli bombs are cut."""

from __future__ import annotations

import gzip
import random
import zlib

import brotli
import pytest

from imgpipe_dagster.fetch import ErrorClass, FetchError
from imgpipe_dagster.fetch.encoding import BoundedBodyDecoder
from imgpipe_dagster.paths import resource_path
from imgpipe_dagster_tests.web.image_server import ImageServer

CAP = 4 * 1024 * 1024
PAYLOAD = resource_path("sample_images/coffee.png").read_bytes()
SERVER = ImageServer()  # not started: only its payload builders are used


def decode_in_chunks(
    encoding: str | None, data: bytes, chunk: int = 65536
) -> tuple[bytes, BoundedBodyDecoder]:
    decoder = BoundedBodyDecoder(encoding, CAP)
    out = bytearray()
    for start in range(0, len(data), chunk):
        out += decoder.feed(data[start : start + chunk])
    out += decoder.flush()
    return bytes(out), decoder


@pytest.mark.parametrize(
    ("encoding", "encoded"),
    [
        (None, PAYLOAD),
        ("identity", PAYLOAD),
        ("gzip", gzip.compress(PAYLOAD)),
        ("x-gzip", gzip.compress(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)[2:-4]),  # raw deflate, as some servers send it
        ("br", brotli.compress(PAYLOAD)),
        ("gzip, br", brotli.compress(gzip.compress(PAYLOAD))),
    ],
)
@pytest.mark.parametrize("chunk", [1, 1000, 65536])
def test_legitimate_encodings_round_trip(encoding: str | None, encoded: bytes, chunk: int) -> None:
    if chunk == 1 and len(encoded) > 100_000:
        encoded_chunks = 997  # byte-by-byte over 500 KB is slow; a prime keeps boundaries irregular
    else:
        encoded_chunks = chunk
    decoded, _ = decode_in_chunks(encoding, encoded, encoded_chunks)
    assert decoded == PAYLOAD


@pytest.mark.parametrize(("encoding", "bomb"), [("gzip", SERVER.gzip_bomb), ("br", SERVER.brotli_bomb)])
def test_bombs_are_cut_at_the_cap_with_bounded_output(encoding: str, bomb) -> None:
    with pytest.raises(FetchError) as caught:
        decode_in_chunks(encoding, bomb())
    assert caught.value.error_class is ErrorClass.DECOMPRESSION_BOMB


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_one_chunk_of_a_bomb_never_inflates_far_past_the_cap(encoding: str) -> None:
    bomb = SERVER.gzip_bomb() if encoding == "gzip" else SERVER.brotli_bomb()
    decoder = BoundedBodyDecoder(encoding, CAP)
    with pytest.raises(FetchError):
        decoder.feed(bomb[:300_000])  # a large first read: the whole brotli bomb, 300 KB of gzip
    assert decoder.decoded_bytes <= CAP + (1 << 20) + 1


def test_big_but_honest_compressed_bodies_are_too_large_not_bombs() -> None:
    noise = random.Random(0).randbytes(CAP + 1000)  # incompressible, and the same every run
    with pytest.raises(FetchError) as caught:
        decode_in_chunks("gzip", gzip.compress(noise, compresslevel=1))
    assert caught.value.error_class is ErrorClass.TOO_LARGE


def test_unknown_encodings_are_undecodable() -> None:
    with pytest.raises(FetchError) as caught:
        BoundedBodyDecoder("compress", CAP)
    assert caught.value.error_class is ErrorClass.UNDECODABLE
