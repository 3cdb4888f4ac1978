"""The fast backend's Qwen2.5-VL vision tower (window attention batched per image size) computes what
transformers' ``model.model.visual`` computes, and the fast backend generates ``model.generate``'s tokens."""

import pytest
import torch
from transformers import Qwen2_5_VLConfig

from imgpipe_dagster.gpu_server.image_prep import PatchGrid, normalise_and_patchify
from imgpipe_dagster.gpu_server.inference import _model_class
from imgpipe_dagster.gpu_server.qwen_fast import FastQwenVL
from imgpipe_dagster.gpu_server.tiny_model import (
    build_tiny_model,
    randomise_biases_and_norms,
    tiny_config_dict,
)
from imgpipe_dagster.settings_map import medium_model_settings
from imgpipe_dagster_tests.gpu_server.conftest import make_image_bytes, open_engine

NEW_TOKENS = 10
# (height, width): whole windows (the tiny model's window is 112 px = 4x4 merged units), then grids
# that leave smaller windows on the right, at the bottom, and both.
WHOLE_WINDOWS = (224, 224)
UNEVEN = [(112, 168), (196, 112), (140, 196)]


@pytest.fixture(scope="module")
def qwen25_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2_5-vl"), arch="qwen2_5_vl")


@pytest.fixture(scope="module")
def hf_engine_25(qwen25_model_dir):
    with open_engine(qwen25_model_dir, "hf", max_new_tokens=NEW_TOKENS) as engine:
        yield engine


@pytest.fixture(scope="module")
def fast_engine_25(qwen25_model_dir):
    with open_engine(qwen25_model_dir, "fast", max_new_tokens=NEW_TOKENS, chunk_size=2) as engine:
        yield engine


def random_images(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8) for h, w in sizes]


@torch.no_grad()
def transformers_features(visual, images):
    """One call of the stock tower over all images (its varlen path), as the HF backend runs it."""
    patch_grid = PatchGrid.from_vision_config(visual.config)
    pixels = torch.cat([normalise_and_patchify(img.unsqueeze(0), patch_grid) for img in images])
    grid = torch.tensor([[1, *patch_grid.patches(*img.shape[:2])] for img in images])
    return visual(pixels, grid_thw=grid).pooler_output


@torch.no_grad()
def fast_features(fast: FastQwenVL, images):
    return fast._vision_features(images)


def test_the_tiny_model_mixes_window_and_full_attention(fast_engine_25):
    fast = fast_engine_25._fast
    assert fast.windowed_vision and fast.v_window == 4 and fast.v_full_blocks == {1}
    assert fast._window_layout(16, 16).window_segments == ((4, 64),)  # 224 px: four whole windows
    # 140x196 px: a whole window, a right-edge one, a bottom-edge one and a corner one
    assert sorted(fast._window_layout(10, 14).window_segments) == [(1, 12), (1, 16), (1, 48), (1, 64)]


@pytest.mark.parametrize("size", [WHOLE_WINDOWS, *UNEVEN])
def test_fast_vision_equals_the_transformers_tower(hf_engine_25, fast_engine_25, size):
    images = random_images([size] * 3, seed=size[0] + size[1])
    expected = transformers_features(hf_engine_25.model.model.visual, images)
    got = fast_features(fast_engine_25._fast, images)
    assert got.shape == expected.shape == (3 * (size[0] // 28) * (size[1] // 28), 64)
    torch.testing.assert_close(got, expected)


def test_fast_vision_keeps_image_order_in_a_batch_of_mixed_sizes(hf_engine_25, fast_engine_25):
    images = random_images([WHOLE_WINDOWS, UNEVEN[0], (28, 28), WHOLE_WINDOWS, UNEVEN[2], UNEVEN[0]], seed=5)
    expected = transformers_features(hf_engine_25.model.model.visual, images)
    got = fast_features(fast_engine_25._fast, images)
    torch.testing.assert_close(got, expected)


def deeper_model_with_three_unit_windows():
    """The tiny config with four blocks, full attention only at block 2, and 84-px windows (3x3 merged
    units), so several window blocks run in a row and more grids leave partial windows."""
    config_dict = tiny_config_dict(vocab_size=1024, special_base_id=1000, arch="qwen2_5_vl")
    config_dict["vision_config"].update(depth=4, fullatt_block_indexes=[2], window_size=84)
    config = Qwen2_5_VLConfig(**config_dict)
    torch.manual_seed(3)
    model = _model_class(config.model_type)._from_config(config, dtype=torch.float32).eval()
    randomise_biases_and_norms(model)
    return model, config


def test_fast_vision_equals_the_transformers_tower_with_more_blocks_and_windows():
    model, config = deeper_model_with_three_unit_windows()
    reference = model.model.visual
    images = random_images([(224, 224), (168, 168), (140, 252), (224, 224), (84, 56)], seed=9)
    expected = transformers_features(reference, images)  # before FastQwenVL re-points the weights
    fast = FastQwenVL(model, config, torch.float32, medium_model_settings("", backend="fast"))
    assert fast.v_window == 3 and fast.v_full_blocks == {2} and len(fast.v_blocks) == 4
    assert fast._window_layout(12, 12).window_segments == ((4, 36),)  # 168 px: whole windows
    assert len(fast._window_layout(16, 16).window_segments) == 4  # 224 px: 3+3+2 units a side
    torch.testing.assert_close(fast_features(fast, images), expected)
    # The weights fused for the fast path still serve the stock tower unchanged.
    torch.testing.assert_close(transformers_features(reference, images), expected)


def test_compiled_fast_vision_equals_the_transformers_tower(qwen25_model_dir, hf_engine_25):
    with open_engine(qwen25_model_dir, "fast", max_new_tokens=NEW_TOKENS, compile_vision=True) as engine:
        images = random_images([UNEVEN[2]] * 2, seed=11)
        got = fast_features(engine._fast, images)
        assert not engine._fast._vision_block.failed  # compiled, not the eager fallback
        torch.testing.assert_close(got, transformers_features(hf_engine_25.model.model.visual, images))


def test_fast_backend_generates_the_same_tokens_as_model_generate(hf_engine_25, fast_engine_25):
    sizes = [(224, 224), (112, 168), (140, 196), (224, 224), (112, 112)]  # five rows in chunks of two
    images = [make_image_bytes(50 + i, width=w, height=h) for i, (h, w) in enumerate(sizes)]
    expected = hf_engine_25.generate(hf_engine_25.prepare(images))
    got = fast_engine_25.generate(fast_engine_25.prepare(images))
    assert fast_engine_25._fast is not None  # still the fast backend: it did not fall back to hf
    assert all(r.error is None for r in got)
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.generated_tokens for r in got] == [r.generated_tokens for r in expected]
    assert len({r.text for r in got}) > 1  # the tiny model's outputs differ per image
