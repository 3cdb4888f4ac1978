"""Content-Encoding removal that never produces more than a cap of output.

httpx's own decoders inflate each received chunk in one call, so 64 KiB of a brotli or gzip bomb
can become gigabytes in memory before any size check runs. Here every decompression call is given
the remaining output budget, so memory stays bounded by the cap whatever the input.
"""

from __future__ import annotations

import zlib

import brotli

from imgpipe_dagster.fetch.errors import ErrorClass, FetchError

# decoded/encoded size ratio from which a body over the cap counts as a bomb rather than merely large:
# images are already compressed, so gzip or brotli shrink them a few times at most
BOMB_RATIO = 100

ACCEPT_ENCODING = "gzip, deflate, br"

# encoded input is decoded this many bytes at a time (at most ~4 MiB of zlib output per slice)
_SLICE_BYTES = 4096


class _Identity:
    def feed(self, data: bytes, limit: int) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Zlib:
    def __init__(self, wbits: int, *, raw_deflate_fallback: bool = False) -> None:
        self._inflater = zlib.decompressobj(wbits)
        # "deflate" is meant to be zlib-wrapped, but some servers send raw deflate
        self._raw_deflate_fallback = raw_deflate_fallback
        self._started = False

    def feed(self, data: bytes, limit: int) -> bytes:
        if not self._started and self._raw_deflate_fallback and len(data) >= 2:
            if not _looks_like_zlib_header(data[0], data[1]):
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        if data:
            self._started = True
        pieces: list[bytes] = []
        produced = 0
        pending = data
        while pending and not self._inflater.eof:
            piece = self._inflater.decompress(pending, max(1, limit - produced + 1))
            pieces.append(piece)
            produced += len(piece)
            if produced > limit:
                break
            pending = self._inflater.unconsumed_tail
        return b"".join(pieces)

    def flush(self) -> bytes:
        return self._inflater.flush() if not self._inflater.eof else b""


def _looks_like_zlib_header(first: int, second: int) -> bool:
    # RFC 1950: compression method 8 (deflate) and a header checksum divisible by 31
    return first & 0x0F == 8 and (first * 256 + second) % 31 == 0


class _Brotli:
    def __init__(self) -> None:
        self._decompressor = brotli.Decompressor()

    def feed(self, data: bytes, limit: int) -> bytes:
        # brotli may overshoot its output limit by one buffer growth, so ask in steps of at most 1 MiB
        pieces: list[bytes] = []
        produced = 0
        piece = self._decompressor.process(data, output_buffer_limit=self._step(limit, produced))
        while True:
            pieces.append(piece)
            produced += len(piece)
            if produced > limit or self._decompressor.can_accept_more_data():
                break
            # the limit was reached with input held back: drain it with empty calls
            piece = self._decompressor.process(b"", output_buffer_limit=self._step(limit, produced))
            if not piece:
                break
        return b"".join(pieces)

    @staticmethod
    def _step(limit: int, produced: int) -> int:
        return max(1, min(1 << 20, limit - produced + 1))

    def flush(self) -> bytes:
        return b""


def _decoder_for(token: str):
    if token in ("", "identity"):
        return _Identity()
    if token in ("gzip", "x-gzip"):
        return _Zlib(zlib.MAX_WBITS | 16)
    if token == "deflate":
        return _Zlib(zlib.MAX_WBITS, raw_deflate_fallback=True)
    if token == "br":
        return _Brotli()
    raise FetchError(ErrorClass.UNDECODABLE, f"unsupported Content-Encoding {token!r}")


class BoundedBodyDecoder:
    """Removes the Content-Encoding layers of a body, raising once the decoded size passes ``max_bytes``."""

    def __init__(self, content_encoding: str | None, max_bytes: int) -> None:
        tokens = [t.strip().lower() for t in (content_encoding or "").split(",") if t.strip()]
        # encodings are listed in the order they were applied; undo them last-first
        self._layers = [_decoder_for(token) for token in reversed(tokens)]
        self.encoded = bool(tokens) and any(t != "identity" for t in tokens)
        self._max_bytes = max_bytes
        self.raw_bytes = 0
        self.decoded_bytes = 0

    def feed(self, raw: bytes) -> bytes:
        if not self.encoded:
            self.raw_bytes += len(raw)
            self._count(raw)
            return raw
        # small slices, so that when the cap is passed raw_bytes counts (nearly) only the input that
        # produced the output, and the expansion ratio tells a bomb from a merely large body
        out = bytearray()
        for start in range(0, len(raw), _SLICE_BYTES):
            piece = raw[start : start + _SLICE_BYTES]
            self.raw_bytes += len(piece)
            for layer in self._layers:
                piece = layer.feed(piece, self._max_bytes - self.decoded_bytes)
            self._count(piece)
            out += piece
        return bytes(out)

    def flush(self) -> bytes:
        data = b""
        for index, layer in enumerate(self._layers):
            tail = layer.flush()
            for later in self._layers[index + 1 :]:
                tail = later.feed(tail, self._max_bytes - self.decoded_bytes)
            data += tail
        self._count(data)
        return data

    def _count(self, data: bytes) -> None:
        self.decoded_bytes += len(data)
        if self.decoded_bytes > self._max_bytes:
            ratio = self.decoded_bytes / max(1, self.raw_bytes)
            if self.encoded and ratio >= BOMB_RATIO:
                raise FetchError(
                    ErrorClass.DECOMPRESSION_BOMB,
                    f"Content-Encoding expands {self.raw_bytes} bytes past the {self._max_bytes}-byte cap "
                    f"(ratio {ratio:.0f}:1)",
                )
            raise FetchError(ErrorClass.TOO_LARGE, f"decoded body exceeds {self._max_bytes} bytes")
