"""CPU image preparation for Qwen-VL: decode, size to the patch grid, and patchify with torch.

The HF image processor is general (any size, video, resampling on every call) and slow; the
fetch stage already delivers resized images, so here decoding is the only per-image cost and
normalising + patchifying runs batched, on the GPU when the engine has one. The layout matches
``Qwen2VLImageProcessor`` exactly (tested in imgpipe_dagster_tests/gpu_server/test_inference.py).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from imgpipe_dagster.fetch.decode import too_many_pixels

# CLIP normalisation constants (the Qwen2-VL preprocessor config values).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PatchGrid:
    """The vision tower's patch geometry, as the model's config states it (Qwen2-VL and Qwen2.5-VL:
    14-px patches, 2×2 of them merged into one token, a still frame repeated over 2 temporal steps)."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int

    @classmethod
    def from_vision_config(cls, vision_config) -> PatchGrid:
        return cls(vision_config.patch_size, vision_config.spatial_merge_size, vision_config.temporal_patch_size)

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this (28 px for Qwen-VL): one merged token's side."""
        return self.patch_size * self.merge_size

    def patches(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of patches of an image already sized to the grid."""
        return height // self.patch_size, width // self.patch_size

    def image_tokens(self, height: int, width: int) -> int:
        return (height // self.factor) * (width // self.factor)


class ImageDecodeError(ValueError):
    pass


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int):
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.
    Same rule as the Qwen2-VL processor."""
    if min(height, width) <= 0:
        raise ImageDecodeError("empty image")
    if max(height, width) / min(height, width) > 200:
        raise ImageDecodeError(f"aspect ratio over 200 ({width}x{height})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(
    data: bytes, min_pixels: int, max_pixels: int, factor: int, max_source_pixels: int | None = None
) -> np.ndarray:
    """Bytes -> RGB uint8 array (H, W, 3) whose sides fit the patch grid. Raises ImageDecodeError,
    also for an image over ``max_source_pixels`` (read from its header: such an image is never decoded)."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_source_pixels is not None and width * height > max_source_pixels:
                raise _oversize(width * height, len(data), max_source_pixels)
            img.load()
            rgb = img.convert("RGB")
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own cap, met before ours can look
        raise _oversize(2 * (Image.MAX_IMAGE_PIXELS or 0) + 1, len(data), max_source_pixels or 0) from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    width, height = rgb.size
    target_h, target_w = smart_resize(height, width, min_pixels, max_pixels, factor)
    if (target_h, target_w) != (height, width):
        rgb = rgb.resize((target_w, target_h), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def _oversize(pixels: int, file_bytes: int, limit: int) -> ImageDecodeError:
    # the fetcher's taxonomy (decompression_bomb or too_large) leads the message, so both sides agree
    return ImageDecodeError(str(too_many_pixels(pixels, file_bytes, limit)))


def normalise_and_patchify(images: torch.Tensor, grid: PatchGrid, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (B, H, W, 3), all one size -> pixel_values (B*gh*gw, 3*T*p*p) in the
    processor's layout: merge-window-major patch order, each patch channel x time x row x col,
    the still frame repeated over the temporal patch."""
    batch, height, width, channels = images.shape
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=images.device) * 255.0
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=images.device) * 255.0
    x = (images.permute(0, 3, 1, 2).to(torch.float32) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return _patchify(x, grid, out_dtype)


def _patchify(x: torch.Tensor, grid: PatchGrid, out_dtype: torch.dtype) -> torch.Tensor:
    batch, channels, height, width = x.shape
    gh, gw = grid.patches(height, width)
    m, p, t = grid.merge_size, grid.patch_size, grid.temporal_patch_size
    x = x.reshape(batch, channels, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, gh/m, gw/m, m, m, C, p, p
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
    return x.reshape(batch * gh * gw, channels * t * p * p).to(out_dtype)


def normalise_and_patchify_single_frame(images: torch.Tensor, grid: PatchGrid, out_dtype: torch.dtype) -> torch.Tensor:
    """Like normalise_and_patchify without repeating the still frame: (B*gh*gw, 3*p*p).
    The fast vision path folds the two temporal halves of the patch-embedding kernel into one."""
    batch, height, width, _ = images.shape
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=images.device) * 255.0
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=images.device) * 255.0
    x = (images.permute(0, 3, 1, 2).to(torch.float32) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    gh, gw = grid.patches(height, width)
    m, p = grid.merge_size, grid.patch_size
    x = x.reshape(batch, 3, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    return x.reshape(batch * gh * gw, 3 * p * p).to(out_dtype)
