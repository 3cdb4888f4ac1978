"""The inference engine on the tiny checkpoint: preparation matches transformers' processor, one bad
image fails alone, and the fast backend computes what ``model.generate`` computes."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

from imgpipe_dagster.gpu_server.image_prep import (
    ImageDecodeError,
    PatchGrid,
    decode_image,
    normalise_and_patchify,
    smart_resize,
)
from imgpipe_dagster.gpu_server.inference import PreparedBatch
from imgpipe_dagster.gpu_server.prompts import UnknownPromptError
from imgpipe_dagster_tests.gpu_server.conftest import make_image_bytes, open_engine

try:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
except ImportError:  # no torchvision: the PIL flavour does the same arithmetic
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil as Qwen2VLImageProcessor,
    )

NEW_TOKENS = 10
QWEN2_VL_GRID = PatchGrid(patch_size=14, merge_size=2, temporal_patch_size=2)


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    with open_engine(tiny_model_dir, "hf", max_new_tokens=NEW_TOKENS) as engine:
        yield engine


@pytest.fixture(scope="module")
def fast_engine(tiny_model_dir):
    with open_engine(tiny_model_dir, "fast", max_new_tokens=NEW_TOKENS, chunk_size=2) as engine:
        yield engine


@pytest.mark.parametrize("size", [(112, 112), (140, 84), (84, 196)])
def test_torch_patchify_equals_the_transformers_processor(size):
    width, height = size
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=448 * 448)
    expected = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    grid = PatchGrid(processor.patch_size, processor.merge_size, processor.temporal_patch_size)
    ours = normalise_and_patchify(torch.from_numpy(pixels).unsqueeze(0), grid)
    assert expected["image_grid_thw"].tolist() == [[1, *grid.patches(height, width)]]
    assert ours.shape == expected["pixel_values"].shape
    torch.testing.assert_close(ours, expected["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_decode_sizes_images_to_the_patch_grid_within_the_pixel_cap():
    factor = QWEN2_VL_GRID.factor
    assert decode_image(make_image_bytes(0, 112, 84), 3136, 448 * 448, factor).shape == (84, 112, 3)
    assert decode_image(make_image_bytes(0, 100, 50), 3136, 448 * 448, factor).shape[:2] == smart_resize(
        50, 100, 3136, 448 * 448, factor)  # fmt: skip
    big = decode_image(make_image_bytes(0, 1000, 800, fmt="JPEG"), 3136, 448 * 448, factor)
    assert big.shape[0] % 28 == 0 and big.shape[1] % 28 == 0
    assert big.shape[0] * big.shape[1] <= 448 * 448
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image", 3136, 448 * 448, factor)
    with pytest.raises(ImageDecodeError):
        decode_image(b"", 3136, 448 * 448, factor)


def test_the_patch_grid_comes_from_the_model_config(hf_engine, tiny_model_dir):
    vision = AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True).vision_config
    assert hf_engine.patch_grid == PatchGrid(vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    # another geometry (16-px patches) sizes images to its own multiples: nothing assumes 14 or 28
    grid = PatchGrid.from_vision_config(Qwen2VLVisionConfig(patch_size=16, spatial_merge_size=2))
    assert grid.factor == 32 and grid.image_tokens(64, 96) == 6
    assert decode_image(make_image_bytes(0, 100, 70), 32 * 32, 448 * 448, grid.factor).shape[:2] == (64, 96)


def test_rope_positions_equal_transformers_get_rope_index(hf_engine):
    batch = hf_engine.prepare([make_image_bytes(1, 140, 84), make_image_bytes(2, 140, 84)])
    grid = torch.tensor([[1, *hf_engine.patch_grid.patches(h, w)] for h, w in batch.grids])
    inner = hf_engine.model.model
    kwargs = dict(image_grid_thw=grid, attention_mask=batch.attention_mask)
    if hf_engine._wants_token_types:
        kwargs["mm_token_type_ids"] = (batch.input_ids == hf_engine._image_token_id).int()
    positions, deltas = inner.get_rope_index(batch.input_ids, **kwargs)
    assert torch.equal(positions, batch.position_ids)
    assert torch.equal(deltas.view(-1) + batch.input_ids.shape[1], batch.next_position)


def test_a_corrupt_image_fails_alone_and_results_keep_request_order(hf_engine):
    images = [make_image_bytes(3), b"\x89PNG broken", make_image_bytes(4), b""]
    batch = hf_engine.prepare(images)
    assert sorted(batch.errors) == [1, 3]
    results = hf_engine.generate(batch)
    assert len(results) == 4
    assert results[1].error and "decode" in results[1].error
    assert results[3].error
    for ok in (results[0], results[2]):
        assert ok.error is None
        assert ok.prompt_tokens == batch.prompt_tokens[0]
        assert 1 <= ok.generated_tokens <= NEW_TOKENS
        assert ok.parse_ok == (ok.analysis is not None)


def test_a_batch_of_only_bad_images_returns_only_errors(hf_engine):
    results = hf_engine.generate(hf_engine.prepare([b"x", b"y"]))
    assert [r.error is not None for r in results] == [True, True]


def test_unknown_prompt_is_refused_before_any_work(hf_engine):
    with pytest.raises(UnknownPromptError):
        hf_engine.prepare([make_image_bytes(0)], prompt_name="no_such_prompt")
    with pytest.raises(UnknownPromptError):
        hf_engine.prepare([make_image_bytes(0)], prompt_name="../etc/passwd")


def test_prompt_version_names_the_prompt_and_its_text_hash(hf_engine):
    version = hf_engine.prompt_version("analysis_v1")
    assert version.startswith("analysis_v1@") and len(version) == len("analysis_v1@") + 12


def test_fast_backend_generates_the_same_tokens_as_model_generate(hf_engine, fast_engine):
    images = [make_image_bytes(10 + i) for i in range(5)]  # five rows in chunks of two
    expected = hf_engine.generate(hf_engine.prepare(images))
    got = fast_engine.generate(fast_engine.prepare(images))
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.generated_tokens for r in got] == [r.generated_tokens for r in expected]
    assert len({r.text for r in got}) > 1  # the tiny model's outputs differ per image


def test_fast_backend_rows_do_not_depend_on_their_batch_neighbours(fast_engine):
    small, wide = make_image_bytes(20, 84, 84), make_image_bytes(21, 196, 112)  # 9 and 28 image tokens
    alone = fast_engine.generate(fast_engine.prepare([small]))[0]
    mixed = fast_engine.generate(fast_engine.prepare([wide, small, b"bad", wide]))
    assert mixed[1].text == alone.text
    assert mixed[0].text == mixed[3].text
    assert mixed[2].error


def test_min_new_tokens_forces_the_full_length(tiny_model_dir):
    for backend in ("hf", "fast"):
        with open_engine(tiny_model_dir, backend, max_new_tokens=6, min_new_tokens=6) as engine:
            results = engine.generate(engine.prepare([make_image_bytes(30), make_image_bytes(31)]))
        assert [r.generated_tokens for r in results] == [6, 6], backend


def test_out_of_memory_splits_the_batch_and_retries(fast_engine, monkeypatch):
    images = [make_image_bytes(40 + i) for i in range(4)]
    expected = [r.text for r in fast_engine.generate(fast_engine.prepare(images))]
    real = fast_engine._run_backend
    seen: list[int] = []

    def run_or_oom(batch: PreparedBatch):
        seen.append(batch.rows)
        if batch.rows > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(batch)

    monkeypatch.setattr(fast_engine, "_run_backend", run_or_oom)
    results = fast_engine.generate(fast_engine.prepare(images))
    assert [r.text for r in results] == expected
    assert seen[0] == 4 and seen.count(1) == 4


def test_every_nth_generate_returns_freed_host_memory(tiny_model_dir, monkeypatch):
    import imgpipe_dagster.gpu_server.inference as inference

    trims = []
    monkeypatch.setattr(inference, "release_free_memory", lambda: trims.append(True) or True)
    with open_engine(tiny_model_dir, "hf", max_new_tokens=2, clear_cache_every_n_requests=2) as engine:
        for _ in range(5):
            engine.generate(engine.prepare([make_image_bytes(0, 56, 56)]))
    assert len(trims) == 2  # after the 2nd and the 4th call
