"""Fixtures for the GPU server tests: a tiny random Qwen2-VL checkpoint built once per session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A loadable tiny Qwen2-VL checkpoint (config, safetensors, tokenizer, preprocessor config)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_vl"), arch="qwen2_vl", seed=0)


def make_image_bytes(seed: int, width: int = 112, height: int = 112, fmt: str = "PNG") -> bytes:
    """Random-noise image bytes (lossless by default, so decoding is exact)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()
