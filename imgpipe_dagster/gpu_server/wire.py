"""Request body of ``POST /v1/analyze``: a compact binary framing of many images.

Content-Type ``application/x-imgpipe-images``; the body is

    4 bytes   big-endian unsigned length H of the header
    H bytes   UTF-8 JSON header: {"prompt": "analysis_v1", "sizes": [n0, n1, ...]}
    n0 bytes  image 0 (the encoded, already-resized bytes the fetch stage produced)
    n1 bytes  image 1
    ...

so images travel as raw bytes (no base64: a third less data and no encode/decode CPU) and the server
slices them without copying or parsing a multipart body. The response is JSON (see app.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

CONTENT_TYPE = "application/x-imgpipe-images"
_HEADER_LENGTH = struct.Struct(">I")
# A header holds a prompt name and one size per image: far below this even for thousands of images.
MAX_HEADER_BYTES = 1024 * 1024


class FramingError(ValueError):
    """The body does not follow the framing above."""


@dataclass(frozen=True)
class AnalyzeRequest:
    prompt: str
    images: list[bytes]


def encode_request(images: Sequence[bytes], prompt: str) -> bytes:
    header = json.dumps({"prompt": prompt, "sizes": [len(image) for image in images]}).encode()
    return b"".join([_HEADER_LENGTH.pack(len(header)), header, *images])


def decode_request(body: bytes) -> AnalyzeRequest:
    if len(body) < _HEADER_LENGTH.size:
        raise FramingError("body shorter than the 4-byte header length")
    (header_length,) = _HEADER_LENGTH.unpack_from(body)
    if header_length > MAX_HEADER_BYTES or _HEADER_LENGTH.size + header_length > len(body):
        raise FramingError(f"header length {header_length} does not fit the body of {len(body)} bytes")
    header_end = _HEADER_LENGTH.size + header_length
    try:
        header = json.loads(body[_HEADER_LENGTH.size : header_end])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FramingError(f"header is not JSON: {error}") from error
    except RecursionError:
        # the stdlib parser recurses once per bracket: a megabyte of `[` would otherwise be a 500
        raise FramingError("header is JSON nested too deep") from None
    if not isinstance(header, dict):
        raise FramingError("header must be a JSON object")
    prompt = header.get("prompt")
    sizes = header.get("sizes")
    if not isinstance(prompt, str) or not prompt:
        raise FramingError("header.prompt must be a non-empty string")
    if not isinstance(sizes, list) or not all(isinstance(size, int) and size >= 0 for size in sizes):
        raise FramingError("header.sizes must be a list of non-negative integers")
    if header_end + sum(sizes) != len(body):
        raise FramingError(
            f"image sizes add up to {sum(sizes)} bytes but the body carries {len(body) - header_end}"
        )
    view = memoryview(body)
    images: list[bytes] = []
    offset = header_end
    for size in sizes:
        images.append(bytes(view[offset : offset + size]))
        offset += size
    return AnalyzeRequest(prompt, images)
