"""The tiny checkpoint loads through the real transformers path, and its tokenizer speaks Qwen."""

import json

import torch
from transformers import AutoConfig, AutoTokenizer

from imgpipe_dagster.gpu_server.inference import _model_class
from imgpipe_dagster.gpu_server.prompts import load_prompt
from imgpipe_dagster.gpu_server.tiny_model import (
    QWEN_SPECIAL_BASE_ID,
    QWEN_SPECIAL_TOKENS,
    build_tokenizer,
    write_random_weights_dir,
)


def test_checkpoint_folder_has_every_file_from_pretrained_needs(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= names
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "qwen2_vl"


def test_from_pretrained_and_generate_run_on_cpu(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)
    model = _model_class(config.model_type).from_pretrained(tiny_model_dir, local_files_only=True).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                             min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_special_tokens_are_single_ids_in_config_order(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    config = AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(QWEN_SPECIAL_TOKENS)))
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    assert max(ids) < config.text_config.vocab_size
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
    assert tokenizer.encode(text, add_special_tokens=False).count(config.image_token_id) == 2


def test_any_text_round_trips_through_the_byte_level_tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    text = 'Ünïcødé {"caption": "a cat 🐈", "tags": []}\n\ttabs'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_matches_the_prompt_layout_the_engine_builds(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    prompt = load_prompt("analysis_v1")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.text}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = prompt.chat_parts()
    assert rendered == before + "<|image_pad|>" + after


def test_prompt_words_are_whole_tokens_so_prompt_lengths_are_realistic():
    tokenizer = build_tokenizer()
    short = load_prompt("caption_short_v1").text
    # "Describe this image in one sentence and list objects." is 10 tokens in Qwen's vocabulary.
    assert len(tokenizer.encode(short).ids) <= 12


def test_random_weights_folder_uses_qwen_ids_and_the_real_architecture(tmp_path):
    folder = write_random_weights_dir(tmp_path / "qwen2-vl-2b", "qwen2-vl-2b")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert config.text_config.hidden_size == 1536
    assert config.text_config.num_hidden_layers == 28
    assert config.vision_config.embed_dim == 1280
    assert config.vision_config.depth == 32
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == QWEN_SPECIAL_BASE_ID
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id == 151655
    assert not (folder / "model.safetensors").exists()
