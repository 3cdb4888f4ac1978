"""Decode, normalise and resize one downloaded image: a pure function of bytes and settings.

Runs in the fetcher's thread pool (Pillow releases the GIL while decoding and resampling).
Order matters for speed and safety: sniff the format from the bytes, read only the header to
refuse huge images, let JPEG decode at a reduced scale (draft mode), and only then decode.
"""

from __future__ import annotations

import io
import math
import re
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgpipe_dagster.fetch.errors import ErrorClass, FetchError
from imgpipe_dagster.fetch.settings import FetchSettings

# Pillow plugins we let parse untrusted bytes; each maps to the magic numbers sniffed below
Image.init()
ACCEPTED_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF") if f in Image.OPEN)

# pixels per byte of file from which an over-limit image counts as a bomb rather than merely large.
# A photo stays far below (a smooth 100 MP greyscale JPEG: ~54 px/byte); zlib packs at most ~1,030:1,
# so an RGB PNG bomb of zeros tops out near 340 px/byte (900 MP in 2.6 MB) and needs counting as one.
BOMB_PIXELS_PER_BYTE = 100

# Pillow warns (once per call site) on images between 1x and 2x its own limit; our stricter
# max_image_pixels check refuses those images anyway, so the warning is only noise in worker logs
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_WHITE = (255, 255, 255)
_PILLOW_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")
_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientations 5-8 swap width and height
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes of a file (None: not an image we accept)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


# bytes needed before sniff_format can decide
SNIFF_BYTES = 12


@dataclass(frozen=True)
class DecodedImage:
    format: str  # detected from the bytes: JPEG, PNG, GIF, WEBP, ...
    width: int  # original width, after EXIF orientation
    height: int  # original height, after EXIF orientation
    image_bytes: bytes  # resized RGB image, encoded per settings.output_format
    resized_width: int
    resized_height: int
    phash: int  # 64-bit DCT perceptual hash as a signed int (fits a Postgres bigint)
    decode_ms: float


def target_size(width: int, height: int, target_pixels: int, multiple: int) -> tuple[int, int]:
    """Largest size with the image's aspect, area within ``target_pixels``, sides multiples of ``multiple``.

    Images already within the budget are only rounded to the nearest multiple (never enlarged further).
    """
    if width * height > target_pixels:
        scale = math.sqrt(target_pixels / (width * height))
        # the epsilon keeps exact fits (2400 px × 0.18666… = 448) from flooring a whole patch away
        new_w = max(multiple, math.floor(width * scale / multiple + 1e-9) * multiple)
        new_h = max(multiple, math.floor(height * scale / multiple + 1e-9) * multiple)
    else:
        new_w = max(multiple, round(width / multiple) * multiple)
        new_h = max(multiple, round(height / multiple) * multiple)
    # a clamped side (very thin images) or rounding up can overshoot the budget: shrink the long side
    if new_w * new_h > target_pixels:
        if new_w >= new_h:
            new_w = max(multiple, target_pixels // new_h // multiple * multiple)
        else:
            new_h = max(multiple, target_pixels // new_w // multiple * multiple)
    return new_w, new_h


def too_many_pixels(pixels: int, file_bytes: int, limit: int) -> FetchError:
    """The error for an image over the pixel ``limit``: a bomb when its pixels are packed densely."""
    density = pixels / max(1, file_bytes)
    if density >= BOMB_PIXELS_PER_BYTE:
        return FetchError(
            ErrorClass.DECOMPRESSION_BOMB,
            f"{pixels:,} pixels packed in {file_bytes:,} bytes ({density:,.0f} px/byte), limit {limit:,} pixels",
        )
    return FetchError(ErrorClass.TOO_LARGE, f"{pixels:,} pixels exceed the limit of {limit:,}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white and high bit depths scaled (not clipped) to 8 bits."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        if mode.startswith("I;16"):
            image = image.convert("I")
        _low, high = image.getextrema()
        if high > 255:
            factor = 255.0 / (65535.0 if high <= 65535 else float(high))
            image = image.point(lambda value: value * factor)
        elif mode == "F" and high <= 1.0:
            image = image.point(lambda value: value * 255.0)
        return image.convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "RGB":
        return image
    return image.convert("RGB")


_DCT_SIZE = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0, :] = math.sqrt(1.0 / n)
    return matrix


_DCT = _dct_matrix(_DCT_SIZE)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash (low 8×8 DCT frequencies of a 32×32 grey thumbnail vs their median), signed."""
    # BOX averaging is the low-pass a hash needs, at a quarter of LANCZOS's cost
    grey = image.convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= 1 << 63 else value


def decode_image(data: bytes, settings: FetchSettings) -> DecodedImage:
    """Decode and resize ``data``; raises a classified FetchError for anything that is not a usable image."""
    started = time.perf_counter()
    sniffed = sniff_format(data[:SNIFF_BYTES])
    if sniffed is None:
        raise FetchError(
            ErrorClass.NOT_AN_IMAGE, f"bytes start with {data[:8]!r}, not a known image signature"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        found = _PILLOW_BOMB_SIZE.search(str(exc))
        pixels = int(found.group(1)) if found else settings.max_image_pixels * 2 + 1
        raise too_many_pixels(pixels, len(data), settings.max_image_pixels) from exc
    except UnidentifiedImageError as exc:
        raise FetchError(
            ErrorClass.UNDECODABLE, f"{sniffed} signature but Pillow cannot parse it: {exc}"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise FetchError(ErrorClass.UNDECODABLE, f"{sniffed} header unreadable: {exc}") from exc
    with image:
        raw_w, raw_h = image.size
        if raw_w <= 0 or raw_h <= 0:
            raise FetchError(ErrorClass.UNDECODABLE, f"{sniffed} with empty size {image.size}")
        if raw_w * raw_h > settings.max_image_pixels:
            raise too_many_pixels(raw_w * raw_h, len(data), settings.max_image_pixels)
        try:
            return _decode_checked(image, data, settings, started)
        except FetchError:
            raise
        except Image.DecompressionBombError as exc:
            raise too_many_pixels(
                settings.max_image_pixels * 2 + 1, len(data), settings.max_image_pixels
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
            raise FetchError(
                ErrorClass.UNDECODABLE, f"{image.format or sniffed} decode failed: {exc}"
            ) from exc


def _decode_checked(image: Image.Image, data: bytes, settings: FetchSettings, started: float) -> DecodedImage:
    detected = image.format or "UNKNOWN"
    raw_w, raw_h = image.size
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except (OSError, SyntaxError, ValueError, TypeError):
        orientation = 1  # unreadable EXIF: keep the image as stored
    target_w, target_h = target_size(raw_w, raw_h, settings.target_pixels, settings.patch_multiple)
    if detected in ("JPEG", "MPO"):
        # decode at 1/2, 1/4 or 1/8 scale in the DCT domain when that still covers the target size
        image.draft(image.mode, (target_w, target_h))
    image.seek(0)  # first frame of an animation
    image.load()
    rgb = _to_rgb(image)
    if rgb.size != (target_w, target_h):
        rgb = rgb.resize((target_w, target_h), Image.Resampling.BICUBIC, reducing_gap=2.0)
    if orientation in range(2, 9):
        rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
    width, height = (raw_h, raw_w) if orientation in _SWAPPING_ORIENTATIONS else (raw_w, raw_h)
    buffer = io.BytesIO()
    if settings.output_format == "JPEG":
        rgb.save(buffer, "JPEG", quality=settings.output_quality, optimize=False)
    else:
        rgb.save(buffer, "PNG", compress_level=1)
    phash = perceptual_hash(rgb)
    return DecodedImage(
        format=detected,
        width=width,
        height=height,
        image_bytes=buffer.getvalue(),
        resized_width=rgb.width,
        resized_height=rgb.height,
        phash=phash,
        decode_ms=(time.perf_counter() - started) * 1000.0,
    )


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
