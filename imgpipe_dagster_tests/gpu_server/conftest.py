"""Helpers for the GPU server tests (the tiny checkpoint fixture, tiny_model_dir, is the root conftest's)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from imgpipe_dagster.gpu_server.inference import InferenceEngine
from imgpipe_dagster.settings_map import medium_model_settings


@contextlib.contextmanager
def open_engine(model_dir: Path, backend: str, **settings) -> Iterator[InferenceEngine]:
    """An inference engine on a checkpoint folder, closed afterwards."""
    engine = InferenceEngine(medium_model_settings(str(model_dir), backend=backend, **settings))
    try:
        yield engine
    finally:
        engine.close()


def make_image_bytes(seed: int, width: int = 112, height: int = 112, fmt: str = "PNG") -> bytes:
    """Random-noise image bytes (lossless by default, so decoding is exact)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def jpeg(color: str, size: int = 56) -> bytes:
    """A small solid-colour JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "JPEG")
    return buffer.getvalue()
